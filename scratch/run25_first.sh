# First command of a session: on an H200 the decode table (issue 26, run22), on an H100 the LM run at lr 2e-3 beside
# issue 28's GPU tests (run27). carry scratch.
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then bash scratch/run22_h200_decode.sh; else bash scratch/run27_lm_and_gpu_tests.sh; fi
