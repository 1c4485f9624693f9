#!/usr/bin/env bash
# Install the plain Hugging Face transformers baseline server (hf_server.py) into benchmarks/.venvs/hf.
# torch is pinned to the local CPU wheel so no CUDA build is pulled. ~1 min. Idempotent.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
VENVS="${BENCH_VENVS:-$HERE/../.venvs}"
VENV="$VENVS/hf"
PY="${PY:-python3.11}"
check() { "$VENV/bin/python" -c "import torch, transformers, fastapi, uvicorn, safetensors" 2>/dev/null; }
if [ -x "$VENV/bin/python" ] && check; then echo "hf: already installed in $VENV"; exit 0; fi
mkdir -p "$VENVS"
[ -f "$VENVS/.gitignore" ] || echo "*" > "$VENVS/.gitignore"  # keep venvs out of git and ruff
"$PY" -m venv "$VENV"
start=$(date +%s)
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q "transformers==${HF_TRANSFORMERS_VERSION:-5.24.0}" safetensors tokenizers fastapi uvicorn matplotlib torch==2.13.0
check || { echo "hf: import check failed"; exit 1; }
echo "hf: installed in $VENV in $(( $(date +%s) - start )) s"
