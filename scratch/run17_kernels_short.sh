# The short fallback command (<= 400 s) when too little device time is left for the LM run: issue 28's precompile
# (GPU test, cold compile plain and precompiled), issue 26's GPU tests and the sorted top-k sweep, then issue 28's
# training attention table at G = 16, 8k with flash-nsa. First: git rev-parse --short HEAD > scratch/commit;
# mkdir -p scratch/peers && cp -r ../shared/peers/flash_nsa scratch/peers/ (untracked; delete after); carry scratch.
export NSA_GIT_COMMIT=$(cat scratch/commit 2>/dev/null) PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
echo "== precompile"
timeout 120 python -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_precompile.py 2>&1 | tail -4
timeout 150 python -c "
import json
from benchmarks.module.cold_compile import compile_time
rows = [compile_time('paper', 4096, 'cuda'), compile_time('paper', 4096, 'cuda', precompiled=True)]
print(json.dumps(rows)); open('$OUT/cold_compile.json', 'w').write(json.dumps(rows, indent=1))
" 2>&1 | grep -v -i warn | tail -3
echo "== decode ($SECONDS s)"
timeout 90 python -m tools.gpu_tests --out $OUT/gpu --per-file 45 --budget 85 tests/kernels/test_step_selection_kernel.py tests/kernels/test_fine_window.py 2>&1 | tail -3
timeout 100 python -m benchmarks.decode.step_warps --contexts 65536,131072 --json $OUT/warps.json 2>&1 | grep "^| selection" | tail -14
[ -d $OUT/gpu ] && (cd $OUT && tar czf gpu.tgz gpu && rm -rf gpu)
echo "== training ($SECONDS s)"
[ $SECONDS -lt 300 ] && timeout $((395 - SECONDS)) python -m benchmarks.module.training --sections attention --seq-lens 8192 --groups 16 --peers scratch/peers --no-compile-time --out $OUT/training.json 2>&1 | grep -v -i warn | tail -8
echo "done at $SECONDS s"
