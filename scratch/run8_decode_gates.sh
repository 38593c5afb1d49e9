# issue 26: the combine's gates computed in the fused combine launch. GPU test of the fused launches, then the
# decode step timed (rows in step and ragged, profile). ~2.5 min on an H100. First: git rev-parse --short HEAD > scratch/commit
export NSA_GIT_COMMIT=$(cat scratch/commit 2>/dev/null)
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 60 python -m tools.gpu_tests --out $OUT/gpu --per-file 50 --budget 55 tests/kernels/test_fine_window.py 2>&1 | tail -2
timeout 200 python -m benchmarks.decode.speed --contexts 8192,65536,131072 --batches 1,16 --ragged --skip prefill --profile --json $OUT/decode.json 2>&1 | tee $OUT/decode.log | grep -v -i warn | grep "^|\|tokens/s\|rror\|GPU kernels" | cut -c1-200 | tail -12
cd $OUT && tar czf run8.tgz gpu && rm -rf gpu
