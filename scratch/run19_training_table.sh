# Issue 28 point 4: the training table re-measured in one session (two commands on one warm machine, the second
# called at once): "g16" = the cold compile (plain and precompiled) and G = 16 at 8k-128k with flash-nsa; "g4" =
# G = 4 at 8k-128k with flash-nsa and the Transformer step. One JSON per length, so a stopped command keeps the rest.
# First: git rev-parse --short HEAD > scratch/commit; mkdir -p scratch/peers && cp -r ../shared/peers/flash_nsa
# scratch/peers/ (untracked; delete after); carry scratch.
export NSA_GIT_COMMIT=$(cat scratch/commit 2>/dev/null) PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
G=${1:-g16}
if [ "$G" = g16 ]; then
  timeout 200 python -m benchmarks.module.training --sections compile --out $OUT/compile.json 2>&1 | grep -v -i warn | tail -3
  GROUPS_=16
else
  GROUPS_=4
fi
for T in 8192 16384 32768 65536 131072; do
  [ $SECONDS -gt 520 ] && { echo "stopped before T $T at $SECONDS s"; break; }
  timeout $((590 - SECONDS)) python -m benchmarks.module.training --sections attention --seq-lens $T --groups $GROUPS_ \
    --peers scratch/peers --no-compile-time --out $OUT/attention_${G}_${T}.json 2>&1 | grep -v -i warn | grep "^|" | tail -3
done
if [ "$G" = g4 ] && [ $SECONDS -lt 480 ]; then
  timeout $((590 - SECONDS)) python -m benchmarks.module.training --sections step --step-shapes 8192x2,32768x1,65536x1 \
    --no-compile-time --out $OUT/step.json 2>&1 | grep -v -i warn | grep "^|" | tail -6
fi
echo "done at $SECONDS s"
