# Issue 28: why the first call after precompile still takes ~2.8 s (the gpu test failed on 2026-12-07): the kernels
# compiled in that call, at T 4096 and 1234, each in a fresh process and cache; then the test with its failure text.
export PYTHONUNBUFFERED=1
for T in 4096 1234; do
  PYTHONPATH=$PWD TRITON_CACHE_DIR=$(mktemp -d) timeout 120 python scratch/diag_precompile.py $T > $OUT/diag_$T.json 2> $OUT/diag_$T.err
  python -c "import json;d=json.load(open('$OUT/diag_$T.json'));print(d['seq_len'],d['precompile'],round(d['first_call_s'],2));[print('  FIRST:',r[:300]) for r in d['compiled_in_first_call']]" || tail -5 $OUT/diag_$T.err
done
TRITON_CACHE_DIR=$(mktemp -d) timeout 100 python -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_precompile.py -x 2>&1 | grep -E "Error|assert|^E " | head -20
echo "done at $SECONDS s"
