# issue 26: the window compression's tilings swept (ragged / in step), then the decode step timed with the
# fastest ragged tiling (set for this run only; the committed default follows the sweep), the top-k's packed keys
# included. GPU tests of both kernels first. Record the commit first: git rev-parse --short HEAD > scratch/commit
export NSA_GIT_COMMIT=$(cat scratch/commit 2>/dev/null)
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 110 python -m tools.gpu_tests --out $OUT/gpu --per-file 50 --budget 100 tests/kernels/test_window_compression.py tests/kernels/test_step_selection_kernel.py 2>&1 | tail -3
timeout 150 python -m benchmarks.decode.compression_tiles --json $OUT/tiles.json 2>&1 | grep -v -i warn | grep "^|" | head -14
timeout 240 python - <<'PY' 2>&1 | tee $OUT/decode.log | grep -v -i warn | grep "^|\|tokens/s\|rror\|tiling\|GPU kernels" | cut -c1-200 | tail -14
import json, sys
from nsa_core.kernels.decode import window_compression as wc
rows = [r for r in json.load(open(__import__("os").environ["OUT"] + "/tiles.json"))["rows"] if r["case"] == "ragged"]
best = min(rows, key=lambda r: r["us"])
wc.TILES = wc.MLPTiles(best["block_n"], best["k_width"], best["num_warps"], best["num_stages"])
print("tiling", wc.TILES, flush=True)
from benchmarks.decode import speed
out = __import__("os").environ["OUT"]
sys.argv = ["speed", "--contexts", "8192,65536,131072", "--batches", "1,16", "--ragged", "--skip", "prefill", "--profile",
            "--json", f"{out}/decode.json"]
speed.main()
PY
cd $OUT && tar czf run7.tgz gpu && rm -rf gpu
