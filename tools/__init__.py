"""Developer tools that are not part of the library: ahead-of-time compilation of the kernels' launches
(aot.py), for the shared-memory sweep and compile timing in benchmarks/."""
