# Issues 23 + 28 in one command on an H100 (device time is short): the best LM design at lr 2e-3 on the 3000-step
# schedule (its rate was never swept; at 1e-3: 0.874 / 0.856 bpb, dense at 2e-3 0.844) trains in the background,
# checkpointed into build/ (ignored: it stays on the warm machine) and paused at the last evaluation it reaches in
# ~570 s, while issue 28's GPU tests (run24) run beside it: they compile on the CPUs and launch small kernels, and
# time nothing but the precompiled first call (0.02 s against a 2 s limit). Argument "tail" (the next command, at
# once): resume and finish the LM run, then dense seed 1 (dense's 3000-step schedule has one seed so far) checkpointed
# the same way. carry scratch.
export NSA_GIT_COMMIT=$(cat scratch/commit 2>/dev/null) PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
mkdir -p build/lm3000_lr2e-3 build/lm3000_dense_s1
ls build/lm_checkpoints 2>/dev/null
NSA='{"gate_biases":[0,0,0],"num_forced_initial_blocks":1,"num_forced_local_blocks":2,"importance_score":"selected_keys"}'
COMMON="--steps 3000 --warmup-steps 100 --eval-every 500 --time-budget-s 0 --checkpoint-dir build/lm_checkpoints"
timeout $((596 - SECONDS)) python -m benchmarks.lm --out build/lm3000_lr2e-3 --models nsa --seeds 0 --lrs 0.002 \
  --compression-lr-scale 0.25 $COMMON --command-budget-s $((572 - SECONDS)) --nsa-options "$NSA" > $OUT/lm_nsa.log 2>&1 &
LM=$!
if [ "$1" != tail ]; then
  bash scratch/run24_gpu_tests_issue28.sh
  wait $LM
else
  wait $LM
  timeout $((596 - SECONDS)) python -m benchmarks.lm --out build/lm3000_dense_s1 --models dense --seeds 1 --lrs 0.002 \
    $COMMON --command-budget-s $((580 - SECONDS)) 2>&1 | grep -vi warn | tail -12
  (cd build && tar czf $OUT/lm3000_dense_s1.tgz lm3000_dense_s1)
fi
grep -vi warn $OUT/lm_nsa.log | tail -14
(cd build && tar czf $OUT/lm3000_lr2e-3.tgz lm3000_lr2e-3)
echo "done at $SECONDS s"
