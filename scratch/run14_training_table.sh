# Issue 28: the training attention table at G = 16 with flash-nsa, after the window backward's 2 stages. ~4 min.
# First: git rev-parse --short HEAD > scratch/commit; mkdir -p scratch/peers && cp -r ../shared/peers/flash_nsa
# scratch/peers/ (untracked; delete after); carry scratch.
export NSA_GIT_COMMIT=$(cat scratch/commit 2>/dev/null)
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 230 python -m benchmarks.module.training --sections attention --seq-lens 8192,16384,65536 --groups 16 --peers scratch/peers --out $OUT/training.json 2>&1 | grep -v -i warn | tail -10
