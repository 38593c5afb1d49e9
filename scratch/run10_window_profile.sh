# First: git rev-parse --short HEAD > scratch/commit. ~4 min.
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 60 python -m tools.gpu_tests --out $OUT/gpu --per-file 55 --budget 58 tests/kernels/test_window_sdpa.py 2>&1 | tail -3
# issue 28: the window on cuDNN chunks against the band kernels (8k, 64k), then where a training forward+backward goes now (paper preset, G = 16, 8k and 32k), for the next lever
timeout 100 python -m benchmarks.kernels.sliding_window --seq-len 8192 --groups 16,4 --no-sweep 2>&1 | grep -v -i warn | tee $OUT/window_8k.txt
timeout 100 python -m benchmarks.kernels.sliding_window --seq-len 65536 --groups 16 --no-sweep 2>&1 | grep -v -i warn | tee $OUT/window_64k.txt
timeout 150 python -m benchmarks.module.profile_steps --seq-len 8192 --top 22 2>&1 | grep -v -i warn | tail -40 | tee $OUT/profile_8k.txt
timeout 100 python -m benchmarks.module.profile_steps --seq-len 32768 --top 16 2>&1 | grep -v -i warn | tail -30 | tee $OUT/profile_32k.txt
