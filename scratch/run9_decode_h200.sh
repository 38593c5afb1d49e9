# issue 26: every target in one run (step rows in step and ragged, attention alone, generation, prefill,
# correctness), GPU tests of the decode kernels first, then the selection-merge / combine warps sweep.
# ~5 min. First: git rev-parse --short HEAD > scratch/commit
export NSA_GIT_COMMIT=$(cat scratch/commit 2>/dev/null)
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 100 python -m tools.gpu_tests --out $OUT/gpu --per-file 45 --budget 95 tests/kernels/test_fine_window.py tests/kernels/test_step_selection_kernel.py tests/kernels/test_window_compression.py tests/kernels/test_selection_merge.py 2>&1 | tail -3
timeout 330 python -m benchmarks.decode.speed --contexts 8192,65536,131072 --batches 1,16 --ragged --profile --json $OUT/decode.json 2>&1 | tee $OUT/decode.log | grep -v -i warn | grep "^|\|tokens/s\|rror\|GPU kernels\|prefill" | cut -c1-200 | tail -16
timeout 120 python -m benchmarks.decode.step_warps --json $OUT/warps.json 2>&1 | tee $OUT/warps.log | grep "^|" | tail -40
(cd $OUT && tar czf run9.tgz gpu && rm -rf gpu)
