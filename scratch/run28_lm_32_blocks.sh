# Issue 23: is the selection budget the LM gap's lever? The best design (shared K/V + selected_keys, compression side at
# 0.25x) with 32 selected blocks of 64 instead of 16 (1 + 2 forced among them) on the 3000-step schedule, lr as the
# first argument (default 0.001; use run27's rate if 2e-3 won). At 16 blocks the selection holds 0.55-0.59 of the far
# mass (the best 16: 0.68-0.71) and the model ends 0.021 behind dense (0.034 in 2k-8k). ~1.3x the selected branch's
# time: over two commands, checkpointed into build/ (ignored: it stays on the warm machine); the second argument "tail"
# in the next command (at once) resumes and finishes. First: git rev-parse --short HEAD > scratch/commit; carry scratch.
export NSA_GIT_COMMIT=$(cat scratch/commit 2>/dev/null) PYTHONUNBUFFERED=1
LR=${1:-0.001}
nvidia-smi --query-gpu=name --format=csv,noheader
mkdir -p build/lm3000_32blocks
timeout $((596 - SECONDS)) python -m benchmarks.lm --out build/lm3000_32blocks --models nsa --seeds 0 --lrs $LR \
  --compression-lr-scale 0.25 --num-selected 32 --steps 3000 --warmup-steps 100 --eval-every 500 --time-budget-s 0 \
  --checkpoint-dir build/lm_checkpoints --command-budget-s $((580 - SECONDS)) \
  --nsa-options '{"gate_biases":[0,0,0],"num_forced_initial_blocks":1,"num_forced_local_blocks":2,"importance_score":"selected_keys"}' \
  2>&1 | grep -vi warn | tail -16
(cd build && tar czf $OUT/lm3000_32blocks.tgz lm3000_32blocks)
echo "done at $SECONDS s"
