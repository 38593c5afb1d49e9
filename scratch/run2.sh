timeout 250 python -m pytest -q -m gpu tests/hf tests/inference -p no:cacheprovider 2>&1 | tail -6 | tee $OUT/gpu_tests.txt
NS='nsa_scratch={"attention":"nsa","options":{"independent_kv":true,"gate_biases":[0,0,0],"num_forced_initial_blocks":1,"num_forced_local_blocks":2}}'
R="python -m benchmarks.retrieval --tasks mqar --seeds 0 --lrs 3e-3 --steps 20000 --stop-at-accuracy 0.99 --define $NS"
$R --out $OUT/mqar256 --models dense --mqar-lengths 256 --mqar-pairs 16 --mqar-vocab 256 --time-budget-s 70 2>&1 | grep -E "step +[0-9]*000 |steps to" | tail -12
$R --out $OUT/mqar1024 --models dense --mqar-lengths 1024 --mqar-pairs 32 --mqar-vocab 512 --time-budget-s 90 2>&1 | grep -E "step +[0-9]*000 |steps to" | tail -12
for size in "1024 32 512" "256 16 256"; do set -- $size
  if python -c "import json,glob,sys; r=[json.load(open(f)) for f in glob.glob('$OUT/mqar$1/runs/*dense*.json')]; sys.exit(0 if any(x['steps_to']['0.9'] for x in r) else 1)"; then
    $R --out $OUT/mqar$1 --models nsa_scratch --mqar-lengths $1 --mqar-pairs $2 --mqar-vocab $3 --time-budget-s 120 2>&1 | grep -E "step +[0-9]*000 |steps to" | tail -12; break; fi; done
cd $OUT && tar czf mqar.tgz mqar* && rm -rf mqar256 mqar1024
