# issue 23: shared K/V + selected_keys (the best NSA at 1500 steps: 0.991 bpb, dense 0.958) on the 3000-step schedule
# of RESULTS.md "Twice the tokens" (dense 0.844, paper_scratch 0.890 there), one seed (argument, default 0): does the
# gap to dense keep shrinking with tokens? ~8 min on an H200 (paper_scratch's 3000 steps trained in 450 s there);
# an H100 may not finish within 10 min. First: git rev-parse --short HEAD > scratch/commit; carry scratch.
export NSA_GIT_COMMIT=$(cat scratch/commit 2>/dev/null)
S=${1:-0}
timeout 590 python -m benchmarks.lm --out $OUT/lm_3000_shared_kv_selected_keys --models nsa --seeds $S --lrs 0.001 --compression-lr-scale 0.25 --steps 3000 --warmup-steps 100 --eval-every 500 --time-budget-s 0 --nsa-options '{"gate_biases":[0,0,0],"num_forced_initial_blocks":1,"num_forced_local_blocks":2,"importance_score":"selected_keys"}' 2>&1 | grep -vi warn | tail -25
cd $OUT && tar czf lm3000_s$S.tgz lm_3000_shared_kv_selected_keys
