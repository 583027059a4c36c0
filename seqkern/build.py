"""`python -m seqkern.build [--all | --runnable | --level L] [--retry]`: builds the C++ kernels into the cache.

Without arguments it builds the level `import seqkern` loads on this machine (this CPU's, or
$SEQKERN_CPU_CAPABILITY). --runnable builds every level this CPU runs (the Makefile's install step, so neither
the tests of the lower levels nor a benchmark pay for a first-use build); --all builds every level, a level above
this CPU's included (a compile check: it cannot be loaded here). --retry rebuilds after a remembered failure.
Each level builds in its own process and none is loaded here.
"""
from __future__ import annotations

import argparse
import sys

from seqkern import _extension


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seqkern.build", description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--all", action="store_true", help=f"every level: {', '.join(_extension.LEVELS)}")
    which.add_argument("--runnable", action="store_true", help="every level this CPU runs (up to its own)")
    which.add_argument("--level", choices=_extension.LEVELS, help="one level")
    parser.add_argument("--retry", action="store_true", help="build again after a failed build of these sources")
    args = parser.parse_args(argv)
    if args.all:
        levels = [level for level in reversed(_extension.LEVELS) if level == "default" or _extension._is_x86_64()]
    elif args.runnable:
        best = _extension.cpu_capability()
        levels = list(reversed(_extension.LEVELS[:_extension.LEVELS.index(best) + 1]))
    else:
        levels = [args.level or _extension.requested_capability()]
    failures = 0
    for level in levels:
        try:
            library = _extension.build(level, retry=args.retry)
        except _extension.BuildError as error:
            print(f"seqkern: {error}", file=sys.stderr)
            failures += 1
        else:
            print(f"seqkern: {level}: {library}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
