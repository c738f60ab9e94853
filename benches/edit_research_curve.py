"""Trade-off curve of one prototype edit: % errors corrected, clean originals kept and photos changed when the
solved change is scaled by s (W0 + s*dW), over the development kit's 5 exemplar stamps. It answers "what would a
perfect guard reach?" for a solver of `edit_research.py` (whose caches and solvers it reuses).

    .venv/bin/python benches/edit_research_curve.py --solver multi --layer 10 \
        --kw '{"layers":[10,11],"lam":30,"mu":10}' --scales 0.25,0.35,0.5,0.7,1
    # --jitter: the solve's augmented copies are 24 photometrically jittered ones (brightness, contrast and
    # saturation, the same draw for the original and the modified copy) followed by the 24 geometric ones;
    # pass "n_aug":48 in --kw to use both sets, 24 for the jittered ones only.
    # --texture-jitter: 24 more copies whose new concept is recoloured; --texture-resample: 24 more copies whose
    # new concept is its own texture turned, mirrored and zoomed (what an experiment build's least_squares did).
    # Solver options of edit_research.solve_cov also apply: "mask_floor" (a least weight for every position, 1:
    # the whole image's positions), "concept_rank" (the change restricted to the r key directions where the
    # new concept has the most energy relative to the old concept's and C's); "restore" (solver multi: the
    # later layers also undo the drift the earlier ones cause on the statistics images and the originals' copies).
    # --resample-wide: wider zooms, recoloured and blurred textures; --natural-statistics: C from the service's
    # default statistics set.
"""
import argparse
import glob
import json
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import edit_research as R  # noqa: E402


def jitter(img, gen):
    brightness, contrast, saturation = (torch.rand(3, generator=gen) * torch.tensor([0.6, 0.6, 1.0])
                                        + torch.tensor([0.7, 0.7, 0.5])).tolist()
    gray = img.mean(0, keepdim=True)
    x = gray + saturation * (img - gray)
    x = x.mean() + contrast * (x - x.mean())
    return (x * brightness).clamp(0, 255)


def recolour(img, gen):
    """A random colour of the new concept: brightness, contrast and a colour matrix near the identity."""
    brightness, contrast = (torch.rand(2, generator=gen) * 0.6 + 0.7).tolist()
    matrix = torch.eye(3) + 0.15 * torch.randn(3, 3, generator=gen)
    x = torch.einsum("oc,chw->ohw", matrix, img)
    x = x.mean() + contrast * (x - x.mean())
    return (x * brightness).clamp(0, 255)


WIDE = False  # --resample-wide


def resample(modified, mask, gen):
    """The new concept's texture at another scale, rotation and offset: the modified copy turned by a multiple
    of 90 degrees, flipped, zoomed by 0.6-1.6 about a random point; where the turned mask is off (the object),
    the modified copy's own pixels stay. WIDE: zoomed by 0.35-2.8 (log-uniform), then recoloured (brightness,
    contrast, saturation) and, one time in two, blurred."""
    turns = int(torch.randint(0, 4, (1,), generator=gen))
    x, k = torch.rot90(modified, turns, (1, 2)), torch.rot90(mask, turns, (1, 2))
    if torch.rand(1, generator=gen).item() < 0.5:
        x, k = x.flip(-1), k.flip(-1)
    zoom = (math.exp(math.log(0.35) + math.log(8) * torch.rand(1, generator=gen).item()) if WIDE
            else 0.6 + torch.rand(1, generator=gen).item())
    size = min(224, max(32, int(round(224 / zoom))))
    x0, y0 = (torch.rand(2, generator=gen) * (224 - size)).long().tolist() if size < 224 else (0, 0)
    crop = lambda t: torch.nn.functional.interpolate(t[None, :, y0:y0 + size, x0:x0 + size], size=(224, 224),
                                                     mode="bilinear", align_corners=False)[0]
    x, k = crop(x), crop(k)
    if zoom < 1:  # zoom out: tile the texture
        reps = int(math.ceil(1 / zoom))
        small = torch.nn.functional.interpolate(modified[None], scale_factor=zoom, mode="bilinear")[0]
        smallk = torch.nn.functional.interpolate(mask[None], scale_factor=zoom, mode="bilinear")[0]
        x = small.repeat(1, reps, reps)[:, :224, :224]
        k = smallk.repeat(1, reps, reps)[:, :224, :224]
    if WIDE:
        x = jitter(x, gen)
        if torch.rand(1, generator=gen).item() < 0.5:
            x = gaussian_blur(x, 0.5 + 1.5 * torch.rand(1, generator=gen).item())
    on = (k > 0.5).float()
    return x * on + modified * (1 - on)


def gaussian_blur(img, sigma):
    """A separable Gaussian blur of a C x H x W image."""
    r = int(2 * sigma) + 1
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    w = torch.exp(-t ** 2 / (2 * sigma * sigma))
    w = w / w.sum()
    x = torch.nn.functional.conv2d(img[:, None], w.view(1, 1, 1, -1), padding=(0, r))
    return torch.nn.functional.conv2d(x, w.view(1, 1, -1, 1), padding=(r, 0))[:, 0]


def use_natural_statistics(layers):
    """C at each layer from the service's default statistics (data/natural/statistics, resized and cropped as
    the service does) instead of the kit's stats/."""
    paths = sorted(glob.glob(os.path.join(R.MAIN, "data/natural/statistics/*.png")))
    images = torch.stack([R.load_photo(p) for p in paths])
    first = torch.cat([R.to_first(R.normalise(images[s:s + 32])) for s in range(0, len(images), 32)])
    for L in layers:
        key, _ = R.keys_at(L, first)
        flat = key.permute(0, 2, 3, 1).reshape(-1, key.shape[1]).double()
        R.layer_data(L)["C"] = flat.T @ flat / flat.shape[0]


def add_jittered_copies(layers, texture_only=False, texture_resample=False):
    """Prepends, per exemplar, N_SOLVE_AUG jittered copies to the solve's augmented set at each layer.
    texture_only: the original stays as it is and only the modified copy's masked region is recoloured (other
    looks of the new concept, the same target)."""
    n = R.N_SOLVE_AUG
    jittered = {}
    for case in R.CASES:
        geometry = torch.Generator().manual_seed(99)  # the same crops and flips as edit_research's copies
        photometry = torch.Generator().manual_seed(7)
        origs, mods, masks = [], [], []
        for o, m, k in R.exemplar_images(case):
            for p in R.aug_params(geometry, n):
                if texture_resample:
                    origs.append(R.apply_aug(o, p))
                    mods.append(R.apply_aug(o * (1 - k) + resample(m, k, photometry) * k, p))
                    masks.append(R.apply_aug(k, p))
                    continue
                if texture_only:
                    origs.append(R.apply_aug(o, p))
                    mods.append(R.apply_aug(o * (1 - k) + recolour(m, photometry) * k, p))
                    masks.append(R.apply_aug(k, p))
                    continue
                state = photometry.get_state()
                origs.append(jitter(R.apply_aug(o, p), photometry))
                photometry.set_state(state)
                mods.append(jitter(R.apply_aug(m, p), photometry))
                masks.append(R.apply_aug(k, p))
        first = lambda images: R.images_to_first(torch.stack(images))
        jittered[case] = dict(orig=first(origs), mod=first(mods), mask=torch.stack(masks))

    def per_exemplar(front, back):
        if front is None:
            return None
        return torch.cat([torch.cat([front[i * n:(i + 1) * n], back[i * n:(i + 1) * n]])
                          for i in range(front.shape[0] // n)])

    for case in R.CASES:
        R.DATA[case]["sa_mask"] = per_exemplar(jittered[case]["mask"], R.DATA[case]["sa_mask"])
        for L in layers:
            ld = R.layer_data(L)[case]
            for part in ["orig", "mod"]:
                key, skip = R.keys_at(L, jittered[case][part])
                old_key, old_skip = ld["sa_" + part]
                ld["sa_" + part] = (per_exemplar(key, old_key), per_exemplar(skip, old_skip))
    R.N_SOLVE_AUG = 2 * n


def curve(solver, layer, case, n_ex, scales, **kw):
    data = R.DATA[case]
    rows = {s: [] for s in scales}
    for stamp in range(5):
        ids = [int(i) for i in (data["ex_stamp"] == stamp).nonzero()[:, 0]][:n_ex]
        label = int(data["ex_label"][ids[0]])
        edits = R.SOLVERS[solver](layer, case, ids, **kw)
        first_layer = min(edits)
        ld = R.layer_data(first_layer)
        d = ld[case]
        other = data["labels"] != label
        sel = other.nonzero()[:, 0]
        mod_key, mod_skip = d["item_mod"]
        orig_key, orig_skip = d["item_orig"]
        photo_key, photo_skip = ld["photos"]
        pick = lambda t: None if t is None else t[sel]
        pre_err = (d["item_mod_top1"][other] != data["labels"][other]).sum().item()
        for s in scales:
            e = {l: R.weight0(l) + s * dw for l, dw in edits.items()}
            post_err = (R.run_from(first_layer, mod_key[sel], pick(mod_skip), e).argmax(1) != data["labels"][sel]).sum().item()
            clean = R.run_from(first_layer, orig_key[sel], pick(orig_skip), e).argmax(1) == data["labels"][sel]
            photos = R.run_from(first_layer, photo_key, photo_skip, e).argmax(1) != ld["photos_top1"]
            rows[s].append((100 * max((pre_err - post_err) / max(pre_err, 1), -1), 100 * clean.float().mean().item(),
                            100 * photos.float().mean().item()))
    for s in scales:
        a = np.array(rows[s])
        print(f"{case} ex={n_ex} s={s:<4}: corrected {a[:, 0].mean():5.1f} ± {a[:, 0].std():4.1f}  clean "
              f"{a[:, 1].mean():5.1f} (min {a[:, 1].min():5.1f})  photos changed {a[:, 2].mean():4.1f} "
              f"(max {a[:, 2].max():4.1f})", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--solver", default="multi", choices=sorted(R.SOLVERS))
    ap.add_argument("--layer", type=int, default=10)
    ap.add_argument("--kw", default='{"layers":[10,11],"lam":30,"mu":10}', help="solver options, JSON")
    ap.add_argument("--scales", default="0.25,0.35,0.5,0.7,1")
    ap.add_argument("--cases", default=",".join(R.CASES))
    ap.add_argument("--nex", type=int, default=1)
    ap.add_argument("--jitter", action="store_true")
    ap.add_argument("--texture-jitter", action="store_true", help="recolour only the new concept in the copies")
    ap.add_argument("--texture-resample", action="store_true",
                    help="the new concept's texture turned, flipped and zoomed in the copies")
    ap.add_argument("--resample-wide", action="store_true",
                    help="with --texture-resample: zooms of 0.35-2.8, recoloured, sometimes blurred")
    ap.add_argument("--natural-statistics", action="store_true",
                    help="C from the service's default statistics instead of the kit's stats/")
    args = ap.parse_args()
    kw = json.loads(args.kw)
    if "layers" in kw:
        kw["layers"] = tuple(kw["layers"])
    global WIDE
    WIDE = args.resample_wide
    R.DATA = R.build_cache()
    if args.natural_statistics:
        use_natural_statistics(kw.get("layers", (args.layer,)))
    if args.jitter or args.texture_jitter or args.texture_resample:
        add_jittered_copies(kw.get("layers", (args.layer,)), texture_only=args.texture_jitter,
                            texture_resample=args.texture_resample)
    for case in args.cases.split(","):
        curve(args.solver, args.layer, case, args.nex, [float(s) for s in args.scales.split(",")], **kw)


if __name__ == "__main__":
    main()
