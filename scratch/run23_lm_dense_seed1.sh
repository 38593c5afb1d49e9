# Issue 23: dense at seed 1 on the 3000-step schedule (its seed 0: 0.844 bpb; the best NSA design's two seeds 0.874 /
# 0.856 there), so the equal-token comparison has two seeds on both sides. Dense trained 280 s on an H200 (703k
# tokens/s), ~400 s expected on an H100. The reach probe also records its far mass. carry scratch.
export NSA_GIT_COMMIT=$(cat scratch/commit 2>/dev/null) PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 585 python -m benchmarks.lm --out $OUT/lm_3000_dense_seed1 --models dense --seeds 1 --lrs 0.002 --steps 3000 --warmup-steps 100 --eval-every 500 --time-budget-s 0 2>&1 | grep -vi warn | tail -16
echo "done at $SECONDS s"
