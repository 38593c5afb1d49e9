# Issue 23: shared K/V + selected_keys on the 3000-step schedule (RESULTS.md "Twice the tokens": dense 0.844,
# paper_scratch 0.890) over two H100 commands: the first pauses at the last evaluation within ~550 s into
# build/lm_checkpoints (ignored, so it stays on the warm machine), the second (the same script, called at once)
# resumes it; with "tail" as the second argument, the second command then runs the decode sweep of run13 too.
# First: git rev-parse --short HEAD > scratch/commit; carry scratch.
export NSA_GIT_COMMIT=$(cat scratch/commit 2>/dev/null) PYTHONUNBUFFERED=1
S=${1:-0}
nvidia-smi --query-gpu=name --format=csv,noheader
ls -la build/lm_checkpoints 2>/dev/null
mkdir -p build/lm3000
timeout 580 python -m benchmarks.lm --out build/lm3000 --models nsa --seeds $S --lrs 0.001 --compression-lr-scale 0.25 --steps 3000 --warmup-steps 100 --eval-every 250 --time-budget-s 0 --checkpoint-dir build/lm_checkpoints --command-budget-s 550 --nsa-options '{"gate_biases":[0,0,0],"num_forced_initial_blocks":1,"num_forced_local_blocks":2,"importance_score":"selected_keys"}' 2>&1 | grep -vi warn | tail -22
(cd build && tar czf $OUT/lm3000_s$S.tgz lm3000)
if [ "$2" = tail ]; then
  timeout 90 python -m tools.gpu_tests --out $OUT/gpu --per-file 45 --budget 85 tests/kernels/test_step_selection_kernel.py tests/kernels/test_fine_window.py tests/kernels/test_sliding_window_kernel.py 2>&1 | tail -3
  timeout 120 python -m benchmarks.decode.step_warps --contexts 65536,131072 --json $OUT/warps.json 2>&1 | grep "^| selection" | tail -14
  (cd $OUT && tar czf gpu.tgz gpu && rm -rf gpu)
fi
