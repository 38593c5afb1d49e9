set -x
nvidia-smi --query-gpu=name,driver_version --format=csv
python scratch/corpus_survey.py > /dev/null
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
timeout 330 python -m pytest -q -m gpu tests/hf tests/inference -p no:cacheprovider -x 2>&1 | tail -15 | tee $OUT/gpu_tests.txt
timeout 200 python -m pytest -q tests/model/test_paper_options.py tests/model/test_module_kernels.py -p no:cacheprovider 2>&1 | tail -8 | tee -a $OUT/gpu_tests.txt
