# Next session's first command (issues 26 and 28), on an H200 if one comes: GPU tests of the decode and window
# kernels, the decode table with every section (issue 26's targets), then the training attention table at G = 16
# with flash-nsa (issue 28). ~9 min. First: git rev-parse --short HEAD > scratch/commit;
# mkdir -p scratch/peers && cp -r ../shared/peers/flash_nsa scratch/peers/ (untracked; delete after); carry scratch.
export NSA_GIT_COMMIT=$(cat scratch/commit 2>/dev/null)
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 90 python -m tools.gpu_tests --out $OUT/gpu --per-file 45 --budget 85 tests/kernels/test_fine_window.py tests/kernels/test_step_selection_kernel.py tests/kernels/test_sliding_window_kernel.py 2>&1 | tail -3
timeout 280 python -m benchmarks.decode.speed --contexts 8192,65536,131072 --batches 1,16 --ragged --profile --json $OUT/decode.json 2>&1 | tee $OUT/decode.log | grep -v -i warn | grep "^|\|tokens/s\|rror\|prefill" | cut -c1-200 | tail -12
timeout 170 python -m benchmarks.module.training --sections attention --seq-lens 8192,16384,65536 --groups 16 --peers scratch/peers --out $OUT/training.json 2>&1 | grep -v -i warn | tail -10
(cd $OUT && tar czf run13.tgz gpu && rm -rf gpu)
