# Issue 26's targets on an H200 (the issue's GPU): the decode table with every section (layer step, attention alone,
# generation, prefill, decoded error, ragged rows, profile). ~5 min. carry scratch.
export NSA_GIT_COMMIT=$(cat scratch/commit 2>/dev/null) PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 560 python -m benchmarks.decode.speed --contexts 8192,65536,131072 --batches 1,16 --ragged --profile --json $OUT/decode.json 2>&1 | tee $OUT/decode.log | grep -v -i warn | grep "^|\|tokens/s\|rror\|prefill" | cut -c1-200 | tail -30
echo "done at $SECONDS s"
