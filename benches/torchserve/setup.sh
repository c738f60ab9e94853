#!/usr/bin/env bash
# Idempotent set-up of the TorchServe side of the serving benchmark: its own venv (.venv), the TorchScript
# export of the model that editserve serves (build/lite0.pt) and its archive (model-store/lite0.mar).
# Quick when everything is in place; the archive is rebuilt when the weights, config.json, handler.py or
# export_model.py change. Needs the project's model package (bash tools/setup.sh makes it) and Java 17+.
#
# Environment: PYTHON (python3), PACKAGE (the model package, default <repo>/models/efficientnet-lite0).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
cd "$HERE"

PYTHON=${PYTHON:-python3}
PACKAGE=${PACKAGE:-$ROOT/models/efficientnet-lite0}
MODEL_NAME=lite0
VENV=$HERE/.venv
# Bumped whenever the package list changes, so that an existing venv gets the new packages.
STAMP=$VENV/.torchserve-setup-v1

start=$(date +%s)

command -v java >/dev/null || { echo "setup: TorchServe needs Java 17+ (apt-get install openjdk-17-jre-headless)" >&2; exit 1; }
for f in model.safetensors config.json; do
  [ -f "$PACKAGE/$f" ] || { echo "setup: $PACKAGE/$f is missing; run 'bash tools/setup.sh' in $ROOT first" >&2; exit 1; }
done

if [ ! -f "$STAMP" ]; then
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # PyPI has no CPU-only torch wheel for Linux: this is the same (CUDA-enabled) wheel as the project venv's,
  # and it runs on the CPU here. TorchServe's own runtime needs are psutil, packaging, pillow, pyyaml, wheel.
  "$VENV/bin/python" -m pip install -q torchserve==0.12.0 torch-model-archiver==0.12.0 torch==2.13.0 \
    psutil packaging pillow pyyaml wheel numpy safetensors
  # The model code only (it needs torch alone); --no-deps as in tools/setup.sh.
  "$VENV/bin/python" -m pip install -q --no-deps efficientnet-lite-pytorch==0.1.0
  touch "$STAMP"
fi

# Rebuild the archive when any of its inputs changed.
inputs=$(cat "$PACKAGE/model.safetensors" "$PACKAGE/config.json" handler.py export_model.py | sha256sum | cut -d' ' -f1)
MAR=model-store/$MODEL_NAME.mar
if [ ! -f "$MAR" ] || [ "$(cat "$MAR.inputs" 2>/dev/null)" != "$inputs" ]; then
  rm -rf build && mkdir -p build model-store
  # One thread: the export is small and the machine is shared.
  OMP_NUM_THREADS=1 "$VENV/bin/python" export_model.py --package "$PACKAGE" --out "build/$MODEL_NAME.pt"
  cp "$PACKAGE/config.json" build/config.json
  "$VENV/bin/torch-model-archiver" --model-name "$MODEL_NAME" --version 1.0 \
    --serialized-file "build/$MODEL_NAME.pt" --handler handler.py --extra-files build/config.json \
    --export-path model-store --force
  echo "$inputs" >"$MAR.inputs"
  echo "setup: wrote $HERE/$MAR"
fi
echo "setup: done in $(( $(date +%s) - start )) s"
