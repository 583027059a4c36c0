"""seqkern's benchmarks: `python -m benchmarks` (what `make bench` runs); see benchmarks/run.py.

One module per op, `bench_<op>.py`, defines `cases(quick=False) -> list[harness.Case]`; the runner
discovers every such module, so a new op's benchmark joins the default set by existing.
"""
