# First command of a session: on an H200 the decode table (issue 26, run22), on an H100 the GPU tests (issue 28, run24).
# carry scratch.
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then bash scratch/run22_h200_decode.sh; else bash scratch/run24_gpu_tests_issue28.sh; fi
