#!/usr/bin/env bash
# Idempotent: the third-party clients the contract tests drive against a live server (tritonclient and the
# KServe SDK for the Open Inference Protocol, Schemathesis for the OpenAPI document), in their own venv so that
# neither they nor the model venv pin the other. Only the tests need it (`make test`); serving does not.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-contract
STAMP=$VENV/.editserve-contract-v3

# Python 3.12 or later where the machine has one (on PATH, or installed by pyenv): under 3.11 Hypothesis trips an
# interpreter bug in Schemathesis' coverage phase, which tests/contract.rs then leaves out.
newer_python() {
  local candidate
  for candidate in python3.13 python3.12; do
    if "$candidate" -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null; then
      command -v "$candidate"
      return
    fi
  done
  if command -v pyenv >/dev/null; then
    local version
    version=$(pyenv versions --bare 2>/dev/null | grep -E '^3\.1[2-9]\.[0-9]+$' | sort -V | tail -n 1 || true)
    if [ -n "$version" ] && [ -x "$(pyenv root)/versions/$version/bin/python" ]; then
      echo "$(pyenv root)/versions/$version/bin/python"
      return
    fi
  fi
  echo "${PYTHON:-python3}"
}

if [ ! -f "$STAMP" ]; then
  rm -rf "$VENV"
  "$(newer_python)" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q "tritonclient[http]==2.73.0" "kserve==0.21.0" "schemathesis==4.32.5"
  touch "$STAMP"
fi
