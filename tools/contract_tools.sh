#!/usr/bin/env bash
# Idempotent: the third-party clients the contract tests drive against a live server (tritonclient and the
# KServe SDK for the Open Inference Protocol, Schemathesis for the OpenAPI document), in their own venv so that
# neither they nor the model venv pin the other. Only the tests need it (`make test`); serving does not.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv-contract
STAMP=$VENV/.editserve-contract-v2
if [ ! -f "$STAMP" ]; then
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q "tritonclient[http]==2.73.0" "kserve==0.21.0" "schemathesis==4.32.5"
  touch "$STAMP"
fi
