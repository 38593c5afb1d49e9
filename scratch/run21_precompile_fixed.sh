# Issue 28: the precompile after the fix (each kernel loaded and its launcher built in the compile threads: Triton 3.6
# builds a C launcher per signature with gcc at the first launch). Diagnosis at T 4096 (kernels compiled / loaded in
# the first call), the gpu test, then the cold compile plain and precompiled. ~200 s. carry scratch.
export NSA_GIT_COMMIT=$(cat scratch/commit 2>/dev/null) PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
PYTHONPATH=$PWD TRITON_CACHE_DIR=$(mktemp -d) timeout 100 python scratch/diag_precompile.py 4096 > $OUT/diag_4096.json 2> $OUT/diag_4096.err
python -c "import json;d=json.load(open('$OUT/diag_4096.json'));print(d['seq_len'],d['precompile'],'first call',round(d['first_call_s'],2),'s');print(' compiled in first call',len(d['compiled_in_first_call']),[r[:120] for r in d['compiled_in_first_call']]);print(' loaded in precompile',len(d['loaded_in_precompile']),'in first call',d['loaded_in_first_call'])" || tail -5 $OUT/diag_4096.err
echo "== gpu test ($SECONDS s)"
TRITON_CACHE_DIR=$(mktemp -d) timeout 100 python -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_precompile.py 2>&1 | grep -E "passed|failed|^E " | head -8
echo "== cold compile ($SECONDS s)"
timeout 150 python -c "
import json
from benchmarks.module.cold_compile import compile_time
rows = [compile_time('paper', 4096, 'cuda'), compile_time('paper', 4096, 'cuda', precompiled=True)]
print(json.dumps(rows)); open('$OUT/cold_compile.json', 'w').write(json.dumps(rows, indent=1))
" 2>&1 | grep -v -i warn | tail -3
echo "done at $SECONDS s"
