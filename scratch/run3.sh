NS='nsa_scratch={"attention":"nsa","options":{"independent_kv":true,"gate_biases":[0,0,0],"num_forced_initial_blocks":1,"num_forced_local_blocks":2}}'
cp -r benchmarks/results/retrieval/needle4k $OUT/needle4k
python -m benchmarks.retrieval --out $OUT/needle4k --tasks needle --needle-lengths 4096 --models dense,nsa_scratch --define "$NS" --seeds 0,1 --lrs 3e-4,1e-3,3e-3 --stop-at-accuracy 0.99 --time-budget-s 60 2>&1 | grep -E "^needle|steps to|│" | tail -30
R="python -m benchmarks.retrieval --tasks mqar --seeds 0 --lrs 3e-3 --steps 20000 --stop-at-accuracy 0.99 --define $NS --mqar-lengths 512 --mqar-pairs 32 --mqar-vocab 512 --out $OUT/mqar512b"
$R --models dense --time-budget-s 70 2>&1 | grep -E "step +[0-9]*000 |steps to" | tail -8
if python -c "import json,glob,sys; r=[json.load(open(f)) for f in glob.glob('$OUT/mqar512b/runs/*dense*.json')]; sys.exit(0 if any(x['steps_to']['0.9'] for x in r) else 1)"; then
  $R --models nsa_scratch --time-budget-s 100 2>&1 | grep -E "step +[0-9]*000 |steps to" | tail -8; fi
cd $OUT && tar czf r3.tgz needle4k mqar512b && rm -rf needle4k mqar512b
