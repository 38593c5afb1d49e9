# issue 23: the LM run of selected_key_slots on the 1500-step schedule, one seed (argument, default 0); ~5 min on an H100
export NSA_GIT_COMMIT=$(cat scratch/commit 2>/dev/null)
S=${1:-0}
timeout 570 python -m benchmarks.lm --out $OUT/lm_1500_split_slots --schedule sweep --models nsa --seeds $S --lrs 0.001 --compression-lr-scale 0.25 --nsa-options '{"independent_kv":true,"gate_biases":[0,0,0],"num_forced_initial_blocks":1,"num_forced_local_blocks":2,"selected_key_slots":6}' 2>&1 | grep -vi warn | tail -25
cd $OUT && tar czf lm_s$S.tgz lm_1500_split_slots
