#!/usr/bin/env bash
# Everything a session lent a GPU runs, in one device call (~5 minutes on an H100 / H200): the tests that need CUDA
# (they skip elsewhere), then benchmarks/gpu.py. Logs go to $OUT (the device tool's folder) or the current folder.
#   bash benchmarks/gpu_session.sh                 # on the device machine, from the repository root
#   GPU_ARGS="--smoke --device cpu" bash benchmarks/gpu_session.sh   # here: checks the script itself
set -o pipefail
out=${OUT:-.}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())" | tee "$out/gpu-versions.log"
python3 -m pytest -p no:cacheprovider tests/test_device.py tests/test_graph_decode.py tests/test_grouped_kernels.py \
    tests/test_kernels.py tests/test_fsdp.py 2>&1 | tail -30 | tee "$out/gpu-tests.log"
(cd benchmarks && python3 gpu.py ${GPU_ARGS:-}) 2>&1 | grep -v -i "warn" | tee "$out/gpu-bench.log"
