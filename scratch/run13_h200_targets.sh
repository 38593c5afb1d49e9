# Next session's first device command (issue 26), on an H200 if one comes: GPU tests of the decode kernels (the
# sorted top-k's included), the selection / combine sweep (is SORTED_TOP_K faster? then flip it and rerun the
# table), then the decode table with every section. ~8 min. First: git rev-parse --short HEAD > scratch/commit;
# carry scratch.
export NSA_GIT_COMMIT=$(cat scratch/commit 2>/dev/null)
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 90 python -m tools.gpu_tests --out $OUT/gpu --per-file 45 --budget 85 tests/kernels/test_step_selection_kernel.py tests/kernels/test_fine_window.py tests/kernels/test_sliding_window_kernel.py 2>&1 | tail -3
timeout 120 python -m benchmarks.decode.step_warps --contexts 65536,131072 --json $OUT/warps.json 2>&1 | grep "^| selection" | tail -14
timeout 270 python -m benchmarks.decode.speed --contexts 8192,65536,131072 --batches 1,16 --ragged --profile --json $OUT/decode.json 2>&1 | tee $OUT/decode.log | grep -v -i warn | grep "^|\|tokens/s\|rror\|prefill" | cut -c1-200 | tail -12
(cd $OUT && tar czf run13.tgz gpu && rm -rf gpu)
