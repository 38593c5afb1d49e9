# Issue 23: shared K/V + selected_keys on the 3000-step schedule (evaluations every 500 steps, as there) (RESULTS.md "Twice the tokens": dense 0.844,
# paper_scratch 0.890) over two H100 commands: the first trains until the last evaluation its ~575 s reach and
# pauses into build/lm_checkpoints (ignored, so it stays on the warm machine); the second (argument "tail",
# called at once) resumes and finishes, then issue 28's precompile (GPU test + cold compile, plain and
# precompiled) and, in the time left, issue 26's GPU tests and the sorted top-k sweep.
# First: git rev-parse --short HEAD > scratch/commit; carry scratch.
export NSA_GIT_COMMIT=$(cat scratch/commit 2>/dev/null) PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
ls -la build/lm_checkpoints 2>/dev/null
mkdir -p build/lm3000
BUDGET=$((582 - SECONDS))
echo "LM command budget ${BUDGET} s"
timeout $((596 - SECONDS)) python -m benchmarks.lm --out build/lm3000 --models nsa --seeds 0 --lrs 0.001 --compression-lr-scale 0.25 --steps 3000 --warmup-steps 100 --eval-every 500 --time-budget-s 0 --checkpoint-dir build/lm_checkpoints --command-budget-s $BUDGET --nsa-options '{"gate_biases":[0,0,0],"num_forced_initial_blocks":1,"num_forced_local_blocks":2,"importance_score":"selected_keys"}' 2>&1 | grep -vi warn | tail -16
(cd build && tar czf $OUT/lm3000_s0.tgz lm3000)
if [ "$1" = tail ]; then
  echo "== precompile ($SECONDS s)"
  timeout $((585 - SECONDS)) python -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_precompile.py 2>&1 | tail -4
  timeout $((585 - SECONDS)) python -c "
import json
from benchmarks.module.cold_compile import compile_time
rows = [compile_time('paper', 4096, 'cuda'), compile_time('paper', 4096, 'cuda', precompiled=True)]
print(json.dumps(rows)); open('$OUT/cold_compile.json', 'w').write(json.dumps(rows, indent=1))
" 2>&1 | grep -v -i warn | tail -3
  echo "== decode ($SECONDS s)"
  [ $SECONDS -lt 440 ] && timeout $((585 - SECONDS)) python -m tools.gpu_tests --out $OUT/gpu --per-file 45 --budget 85 tests/kernels/test_step_selection_kernel.py tests/kernels/test_fine_window.py tests/kernels/test_sliding_window_kernel.py 2>&1 | tail -3
  [ $SECONDS -lt 470 ] && timeout $((590 - SECONDS)) python -m benchmarks.decode.step_warps --contexts 65536,131072 --json $OUT/warps.json 2>&1 | grep "^| selection" | tail -14
  [ -d $OUT/gpu ] && (cd $OUT && tar czf gpu.tgz gpu && rm -rf gpu)
fi
echo "done at $SECONDS s"
