# issue 28: the window backward on 2 stages: GPU tests, the sweep at 8k / 64k (G = 16), ~2.5 min.
# First: git rev-parse --short HEAD > scratch/commit
export NSA_GIT_COMMIT=$(cat scratch/commit 2>/dev/null)
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 70 python -m tools.gpu_tests --out $OUT/gpu --per-file 65 --budget 68 tests/kernels/test_sliding_window_kernel.py 2>&1 | tail -3
timeout 80 python -m benchmarks.kernels.window_backward --seq-lens 8192,65536 --groups 16 --json $OUT/window_backward.json 2>&1 | grep -v -i warn | grep "^|" | tail -16
(cd $OUT && tar czf run12.tgz gpu && rm -rf gpu)
