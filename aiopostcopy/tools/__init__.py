"""Tools built on the library: the demo, workloads, page patterns, network namespaces, progress.

Nothing in the library imports these: they sit on top of it, beside the
command line, and tests and benchmarks use them.
"""
