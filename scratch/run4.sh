NS='nsa_scratch={"attention":"nsa","options":{"independent_kv":true,"gate_biases":[0,0,0],"num_forced_initial_blocks":1,"num_forced_local_blocks":2}}'
python -m benchmarks.retrieval --tasks mqar --seeds 0 --lrs 1e-3 --steps 20000 --stop-at-accuracy 0.99 --define "$NS" --mqar-lengths 512 --mqar-pairs 32 --mqar-vocab 512 --out $OUT/mqar512c --models nsa_scratch --time-budget-s 190 2>&1 | grep -E "step +[0-9]*000 |steps to" | tail -8
timeout 170 python -m pytest -q -m gpu tests/inference -p no:cacheprovider 2>&1 | tail -4 | tee $OUT/gpu_tests.txt
cd $OUT && tar czf r4.tgz mqar512c && rm -rf mqar512c
