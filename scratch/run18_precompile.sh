# The last short command (<= 220 s): issue 28's precompile (GPU test, cold compile plain and precompiled), then, in
# the time left, issue 26's sorted top-k sweep. First: git rev-parse --short HEAD > scratch/commit; carry scratch.
export NSA_GIT_COMMIT=$(cat scratch/commit 2>/dev/null) PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python -c "
import json
from benchmarks.module.cold_compile import compile_time
rows = [compile_time('paper', 4096, 'cuda'), compile_time('paper', 4096, 'cuda', precompiled=True)]
print(json.dumps(rows)); open('$OUT/cold_compile.json', 'w').write(json.dumps(rows, indent=1))
" 2>&1 | grep -v -i warn | tail -3
echo "== precompile test ($SECONDS s)"
timeout $((190 - SECONDS)) python -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_precompile.py 2>&1 | tail -4
echo "== sweep ($SECONDS s)"
[ $SECONDS -lt 150 ] && timeout $((215 - SECONDS)) python -m benchmarks.decode.step_warps --contexts 65536 --json $OUT/warps.json 2>&1 | grep "^| selection" | tail -8
echo "done at $SECONDS s"
