"""Tools shared by the tests and the benchmarks, so that neither imports the other. Not part of the package.

Both find it without installing: `tests/conftest.py` and the benchmark scripts that use it put the repository root
on `sys.path`.
"""
