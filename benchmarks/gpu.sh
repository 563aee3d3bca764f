#!/usr/bin/env bash
# benchmarks/gpu.py on a machine with a CUDA GPU and PyTorch, in one command (README, "The GPU path").
#
#     bash benchmarks/gpu.sh [OUTDIR]        # from the repository root; OUTDIR defaults to ./gpu-figures
#
# mnistlab runs from the checkout (no install needed: the script needs only torch, torchvision,
# numpy, pyyaml, safetensors and tqdm; MNIST ships in the checkout). Wheels placed in .whl/ beforehand
# (anything the machine lacks) are installed into a private folder first, for
# machines that cannot reach a package index; the machine's own packages are left as they are.
# Prints as it goes and writes gpu.json, gpu.log and nvidia-smi.csv to OUTDIR.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-figures}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/mnistlab-site .whl/*.whl
    export PYTHONPATH=/tmp/mnistlab-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export MNISTLAB_DATA_DIR=${MNISTLAB_DATA_DIR:-/tmp/mnistlab-data}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/nvidia-smi.csv" || true
set -o pipefail
python3 benchmarks/gpu.py --json "$out/gpu.json" "${@:2}" 2>&1 | tee "$out/gpu.log"
