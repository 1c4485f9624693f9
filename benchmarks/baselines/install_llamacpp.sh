#!/usr/bin/env bash
# Install llama-cpp-python (OpenAI server extra) into its own venv: benchmarks/.venvs/llamacpp.
# PyPI ships only the sdist, so this compiles llama.cpp: 5-12 min on 2 cores. Idempotent.
# Never a test dependency; used only by benchmarks/serving.py.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
VENVS="${BENCH_VENVS:-$HERE/../.venvs}"
VENV="$VENVS/llamacpp"
PY="${PY:-python3.11}"
VERSION="${LLAMACPP_VERSION:-0.3.36}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import llama_cpp.server" 2>/dev/null; then
  echo "llamacpp: already installed in $VENV"; exit 0
fi
mkdir -p "$VENVS"
[ -f "$VENVS/.gitignore" ] || echo "*" > "$VENVS/.gitignore"  # keep venvs out of git and ruff
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
start=$(date +%s)
# Reduced build (no llava, tests, examples, tools, C++ server, curl): ENVIRONMENT.md section 5.
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF" \
  nice -n "${NICE:-10}" "$VENV/bin/pip" install --no-cache-dir "llama-cpp-python[server]==$VERSION"
"$VENV/bin/python" -c "import llama_cpp, llama_cpp.server; print('llama_cpp', llama_cpp.__version__)"
echo "llamacpp: installed in $VENV in $(( $(date +%s) - start )) s"
