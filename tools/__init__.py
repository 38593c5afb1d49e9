"""Developer tools that are not part of the library, run with `python -m tools.NAME` from the
repository root: ahead-of-time compilation of the kernels' launches (aot), the documented support
matrix as kernel launches (kernel_launches), the shared-memory sweep of every kernel the launchers
can pick, compiled ahead of time for an H100 (smem_sweep), and the cold compile time of one
configuration (compile_time)."""
