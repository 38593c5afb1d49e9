# Issue 23: the best LM design (shared K/V + selected_keys, compression side at 0.25x) at lr 2e-3, dense's and the
# window's best rate, on the 3000-step schedule (at 1e-3: 0.874 / 0.856 bpb, dense at 2e-3 0.844). Its rate was never
# swept: paper_scratch lost at 2e-3 on 1500 steps, paper_scratch at compression 0.25x was level there. Seed as the
# argument (default 0). ~450 s of training on an H100 (435-465k tokens/s). First: git rev-parse --short HEAD >
# scratch/commit; carry scratch.
export NSA_GIT_COMMIT=$(cat scratch/commit 2>/dev/null) PYTHONUNBUFFERED=1
S=${1:-0}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout $((596 - SECONDS)) python -m benchmarks.lm --out $OUT/lm_3000_shared_kv_selected_keys --models nsa --seeds $S --lrs 0.002 --compression-lr-scale 0.25 --steps 3000 --warmup-steps 100 --eval-every 500 --time-budget-s 0 --nsa-options '{"gate_biases":[0,0,0],"num_forced_initial_blocks":1,"num_forced_local_blocks":2,"importance_score":"selected_keys"}' 2>&1 | grep -vi warn | tail -16
echo "done at $SECONDS s"
