# issue 26: GPU tests of the fused selected + window + combine launches, then the decode step timed (rows in step
# and --ragged), generation included. ~6 min on an H100. Record the commit first: git rev-parse --short HEAD > scratch/commit
export NSA_GIT_COMMIT=$(cat scratch/commit 2>/dev/null)
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python -m tools.gpu_tests --out $OUT/gpu --per-file 70 --budget 145 tests/kernels/test_fine_window.py tests/kernels/test_paged_decode_kernel.py tests/inference/test_generate.py tests/inference/test_sampling.py 2>&1 | tail -6
timeout 300 python -m benchmarks.decode.speed --contexts 8192,65536,131072 --batches 1,16 --ragged --skip prefill --profile --json $OUT/decode.json 2>&1 | tee $OUT/decode.log | grep -v -i warn | grep -v scaled_dot | grep -v "^step" | grep -v "^ragged step" | grep "^|\|tokens/s\|rror\|decoded" | cut -c1-260 | tail -16
cd $OUT && tar czf run6.tgz gpu && rm -rf gpu
