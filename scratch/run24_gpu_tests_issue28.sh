# Issue 28's "GPU tests pass on the device after the change": the support matrix, determinism, packed rows, query
# offsets and the window / tiles / precompile kernels, one pytest process per file (tools.gpu_tests), ~9 min. The
# matrix runs on 5 workers (14 ran the H100 out of memory: NOTES "Support matrix on one GPU"). carry scratch.
export NSA_GIT_COMMIT=$(cat scratch/commit 2>/dev/null) PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 300 python -m pytest -q -p no:cacheprovider -m gpu -n 5 tests/kernels/test_selected_attention_matrix.py 2>&1 | tail -3
timeout $((585 - SECONDS)) python -m tools.gpu_tests --out $OUT/gpu --per-file 90 --budget $((575 - SECONDS)) \
  tests/kernels/test_selected_attention_kernel.py tests/kernels/test_packed_kernels.py tests/kernels/test_sliding_window_kernel.py \
  tests/kernels/test_selected_tiles.py tests/kernels/test_long_offsets.py tests/kernels/test_compressed_scoring.py \
  tests/model/test_packed.py tests/kernels/test_precompile.py 2>&1 | tail -12
[ -d $OUT/gpu ] && (cd $OUT && tar czf gpu.tgz gpu && rm -rf gpu)
echo "done at $SECONDS s"
