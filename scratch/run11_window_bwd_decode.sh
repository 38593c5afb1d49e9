# issue 28: the window's backward settings swept (dK/dV in one loop, warps, tiles); issue 26: the decode targets
# with the combine's new warps. GPU tests first. ~7 min. First: git rev-parse --short HEAD > scratch/commit
export NSA_GIT_COMMIT=$(cat scratch/commit 2>/dev/null)
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 110 python -m tools.gpu_tests --out $OUT/gpu --per-file 50 --budget 105 tests/kernels/test_sliding_window_kernel.py tests/kernels/test_fine_window.py 2>&1 | tail -3
timeout 170 python -m benchmarks.kernels.window_backward --seq-lens 8192,65536 --groups 16,4 --json $OUT/window_backward.json 2>&1 | grep -v -i warn | grep "^|" | tail -50
timeout 300 python -m benchmarks.decode.speed --contexts 8192,65536,131072 --batches 1,16 --ragged --profile --json $OUT/decode.json 2>&1 | tee $OUT/decode.log | grep -v -i warn | grep "^|\|tokens/s\|rror\|GPU kernels\|prefill" | cut -c1-200 | tail -18
(cd $OUT && tar czf run11.tgz gpu && rm -rf gpu)
