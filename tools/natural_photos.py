#!/usr/bin/env python3
"""Natural-photo sets built from photographs that Debian packages ship.

  data/natural/statistics/*.png  default edit statistics (second moment of a layer's features)
  data/natural/check/*.png       breakage check set (an edit must not change their top-1)
  data/natural/SOURCES.txt       provenance: package, version, file and set of every source photo

Every source photo (listed in SOURCES below, hand-picked: colour photographs of everyday scenes, objects,
animals, people and landscapes; no drawings, renders, screenshots or annotated figures) belongs to exactly
one set, so the two sets share no source file. Each photo yields several random square crops (40-100% of
its short side, random horizontal flip, bicubic resize to 224x224) drawn with a fixed seed, so the sets are
reproducible from the same package versions. None of these packages is one that the development benchmark
(shared/bench-dev/fetch.sh) or the tests (foolbox) draw on.

tools/setup.sh downloads and unpacks the packages; this script only reads the unpacked files:
  natural_photos.py list                        "PACKAGE PATH" per source photo (for the unpack step)
  natural_photos.py build --cache C --out DIR   DIR/{statistics,check}/*.png and DIR/SOURCES.txt, from
                                                C/PACKAGE_*.deb (version) and C/unpacked/PACKAGE/PATH
"""
import argparse
import glob
import os
import re
import subprocess
import sys

import numpy as np
from PIL import Image

SIZE = 224
SEED = 20240611
MIN_SCALE, MAX_SCALE = 0.4, 1.0

_CV = "usr/share/doc/opencv-doc/"
_PLASMA = "usr/share/wallpapers/{}/contents/images/2560x1600.jpg"
_SKIMAGE = "usr/lib/python3/dist-packages/skimage/data/"

# package -> files (paths inside the package, no leading './'). Near-duplicate pairs (stereo pairs, the
# same scene at two exposures) are represented by one file only, so no scene is in both sets.
SOURCES = {
    "opencv-doc": [_CV + p for p in [
        "examples/alphamat/input_images/plant.jpg",
        "examples/data/aero1.jpg",
        "examples/data/aloeL.jpg",
        "examples/data/apple.jpg",
        "examples/data/baboon.jpg",
        "examples/data/board.jpg",
        "examples/data/building.jpg",
        "examples/data/butterfly.jpg",
        "examples/data/chicky_512.png",
        "examples/data/ela_original.jpg",
        "examples/data/fruits.jpg",
        "examples/data/home.jpg",
        "examples/data/leuvenA.jpg",
        "examples/data/licenseplate_motion.jpg",
        "examples/data/messi5.jpg",
        "examples/data/orange.jpg",
        "examples/data/rubberwhale1.png",
        "examples/data/squirrel_cls.jpg",
        "examples/dnn_superres/butterfly.png",
        "examples/hfs/data/000.jpg",
        "examples/reg/home.png",
        "examples/text/scenetext01.jpg",
        "examples/text/scenetext02.jpg",
        "examples/text/scenetext03.jpg",
        "examples/text/scenetext04.jpg",
        "examples/text/scenetext05.jpg",
        "examples/text/scenetext06.jpg",
        "opencv4/html/227943776_1.jpg",
        "opencv4/html/230501201_1.jpg",
        "opencv4/html/astra_color.jpg",
        "opencv4/html/pexels_double_decker_bus.jpg",
        "opencv4/html/bicubicOutput.jpg",
        "opencv4/html/fusion_mertens.jpg",
        "opencv4/html/retina_TreeHdr_small.jpg",
        "opencv4/html/Background_Subtraction_Tutorial_frame.jpg",
        "opencv4/html/studentsSample_input.jpg",
    ]],
    "plasma-workspace-wallpapers": [_PLASMA.format(n) for n in [
        "BytheWater", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "OneStandsOut", "Path",
        "summer_1am",
    ]],
    "python3-skimage": [_SKIMAGE + n for n in [
        "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
    ]],
    "python3-sklearn": ["usr/lib/python3/dist-packages/sklearn/datasets/images/" + n
                        for n in ["china.jpg", "flower.jpg"]],
    "lomiri-wallpapers-20.04": ["usr/share/backgrounds/" + n
                                for n in ["Kleiber_by_Lukas_Baubkus.jpg", "Infinite-Sea_by_Aury88.jpg"]],
}


def assign(sources, check_every):
    """(package, path, set) per source: within each package, a seeded shuffle puts every
    check_every-th photo into the check set, so both sets draw on every package."""
    rng = np.random.default_rng(SEED)
    out = []
    for pkg in sorted(sources):
        paths = list(sources[pkg])
        order = rng.permutation(len(paths))
        for rank, i in enumerate(order):
            out.append((pkg, paths[i], "check" if rank % check_every == check_every // 2 else "statistics"))
    return out


def load_rgb(path):
    im = Image.open(path)
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        im = Image.fromarray((np.asarray(im, dtype=np.float64) / 257.0).clip(0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return im.convert("RGB")


def crops(im, n, rng):
    w, h = im.size
    short = min(w, h)
    for _ in range(n):
        side = max(1, int(round(short * rng.uniform(MIN_SCALE, MAX_SCALE))))
        x = int(rng.integers(0, w - side + 1))
        y = int(rng.integers(0, h - side + 1))
        flip = bool(rng.random() < 0.5)
        c = im.crop((x, y, x + side, y + side)).resize((SIZE, SIZE), Image.BICUBIC)
        if flip:
            c = c.transpose(Image.FLIP_LEFT_RIGHT)
        yield c


def deb_version(cache, pkg):
    debs = sorted(glob.glob(os.path.join(cache, f"{pkg}_*.deb")))
    if not debs:
        sys.exit(f"natural_photos: no {pkg}_*.deb in {cache}")
    return subprocess.run(["dpkg-deb", "-f", debs[-1], "Version"], check=True, capture_output=True,
                          text=True).stdout.strip()


def slug(path):
    stem = os.path.splitext(path)[0]
    if "/wallpapers/" in path:  # plasma: the wallpaper's name, not its resolution
        stem = path.split("/wallpapers/")[1].split("/")[0]
    elif "/opencv-doc/" in path:
        stem = stem.split("/opencv-doc/")[1].replace("examples/", "").replace("opencv4/html/", "")
    else:
        stem = os.path.basename(stem)
    return re.sub(r"[^A-Za-z0-9]+", "-", stem).strip("-")


def build(cache, out, n_stat, n_check, check_every):
    plan = assign(SOURCES, check_every)
    versions = {pkg: deb_version(cache, pkg) for pkg in SOURCES}
    rng = np.random.default_rng(SEED)
    os.makedirs(os.path.join(out, "statistics"))
    os.makedirs(os.path.join(out, "check"))
    lines = ["# package\tversion\tfile\tset\tcrops (generated by tools/natural_photos.py, seed %d)" % SEED]
    counts = {}
    for set_name, target in (("statistics", n_stat), ("check", n_check)):
        members = [(pkg, path) for pkg, path, s in plan if s == set_name]
        per = [target // len(members) + (1 if i < target % len(members) else 0) for i in range(len(members))]
        k = 0
        for (pkg, path), n in zip(members, per):
            src = os.path.join(cache, "unpacked", pkg, path)
            if not os.path.isfile(src):
                sys.exit(f"natural_photos: {src} missing (package {pkg} {versions[pkg]} no longer ships it?)")
            im = load_rgb(src)
            name = f"{pkg}--{slug(path)}"
            for j, c in enumerate(crops(im, n, rng)):
                c.save(os.path.join(out, set_name, f"{k:04d}_{name}_{j}.png"), optimize=False)
                k += 1
            lines.append(f"{pkg}\t{versions[pkg]}\t/{path}\t{set_name}\t{n}")
        counts[set_name] = (len(members), k)
    with open(os.path.join(out, "SOURCES.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    for s, (m, k) in counts.items():
        print(f"natural photos: {s}: {k} images from {m} source photos")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list")
    b = sub.add_parser("build")
    b.add_argument("--cache", required=True)
    b.add_argument("--out", required=True, help="must not exist yet")
    b.add_argument("--statistics", type=int, default=240)
    b.add_argument("--check", type=int, default=120)
    b.add_argument("--check-every", type=int, default=3, help="one source photo in N goes to the check set")
    a = ap.parse_args()
    if a.cmd == "list":
        for pkg in sorted(SOURCES):
            for path in SOURCES[pkg]:
                print(pkg, path)
    else:
        build(a.cache, a.out, a.statistics, a.check, a.check_every)


if __name__ == "__main__":
    main()
