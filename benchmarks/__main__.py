"""`python -m benchmarks [--only OP ...] [--quick] [--out DIR]`: the default benchmark set."""
import sys

from benchmarks.run import main

sys.exit(main())
