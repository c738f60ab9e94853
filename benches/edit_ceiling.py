"""How far the covariance least-squares rewrite can go when information is not the limit: the objective of
`least_squares` (masked positions of the re-textured image should give the original's values, with the
statistics C and the originals' own keys as penalties; several layers solved in turn on the edited model) is
fitted on the development kit's own items — n item pairs of half the object classes, the kit's real textures —
and judged on the items of the other half, with the kit's metrics, for a range of scales s of the change.

Against the one-exemplar curve of `edit_research_curve.py` it separates the two reasons an edit corrects too
little: too little information (one exemplar: the ceiling is far above the exemplar's curve) or an objective that
does not correct even with the answers in hand (the ceiling itself is low).

    .venv/bin/python benches/edit_ceiling.py --layers 10,11 --lams 30,10 --items 1,3,10,40
    # --one-texture: the n training items all share one new-concept texture (the kit's `style`), as an exemplar's
    # copies do; --unseen-textures: the new concept's textures (the kit's `style`) are split in half as well, and
    # the judged items show only textures no training item shows; --splits: how many random halves are averaged;
    # --objective logits: a classification objective by gradient descent instead (fit_logits; --lams weigh its
    # KL terms).

Uses `edit_research.py`'s caches (/tmp/research); the kit's item masks are read here. Research only: nothing of
the kit may reach the product (its README: tune on it, never hard-code from it).
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import edit_research as R  # noqa: E402


def item_meta(case):
    root = os.path.join(R.BENCH, case)
    items = json.load(open(os.path.join(root, "items.json")))
    kept = [items[int(i)] for i in R.DATA[case]["keep"]]
    masks = torch.stack([R.load_mask(os.path.join(root, "items", f"{it['id']:04d}_mask.png")) for it in kept])
    return kept, masks


def solve_layer(L, orig, modified, mask, lam, mu):
    """least_squares at one layer from aligned (key, skip) pairs: dW = B (A + mu' A_old + lam' C)^-1."""
    (ko, so), (kn, sn) = orig, modified
    a, _ = R.affine(L)
    W0 = R.weight0(L).double()
    ko, kn = ko.double(), kn.double()
    m = F.adaptive_avg_pool2d(mask, ko.shape[-2:]).double()
    target = R.conv_value(L, ko, so)
    skip_new = torch.zeros_like(target) if sn is None else sn.double() / a.double()[:, None, None]
    w = R.flat(m)
    Kn, Ko = R.flat(kn), R.flat(ko)
    r = R.flat(target) - R.flat(skip_new) - Kn @ W0.T
    A = (Kn * w).T @ Kn / w.sum()
    Ao = (Ko * w).T @ Ko / w.sum()
    B = (r * w).T @ Kn / w.sum()
    C = R.layer_data(L)["C"]
    H = A + mu * torch.trace(A) / torch.trace(Ao) * Ao + lam * torch.trace(A) / torch.trace(C) * C
    return (B @ torch.linalg.inv(R.floored(H))).float()


def fit_logits(L, case, train, lam):
    """A classification objective instead (edit_research.fit_answers, 150 steps): the re-textured training
    items should get their labels, with the unedited answers kept on their originals and the statistics images."""
    d = R.layer_data(L)[case]
    pick = lambda pair: (pair[0][train], None if pair[1] is None else pair[1][train])
    return R.fit_answers(L, pick(d["item_mod"]), pick(d["item_orig"]), lam, steps=150,
                         labels=R.DATA[case]["labels"][train])


def fit(layers, case, train, masks, lam, mu):
    """Each layer solved on the model the layers before it changed (as the service's `layers`)."""
    first = R.layer_data(layers[0])[case]
    pick = lambda pair: (pair[0][train], None if pair[1] is None else pair[1][train])
    edits = {}
    for L in layers:
        if L == layers[0]:
            modified = pick(first["item_mod"])
        else:
            full = {l: R.weight0(l) + d for l, d in edits.items()}
            modified = R.keys_from(layers[0], *pick(first["item_mod"]), full, L)
        edits[L] = solve_layer(L, pick(R.layer_data(L)[case]["item_orig"]), modified, masks[train], lam, mu)
    return edits


def judge(layers, case, test, edits, scales):
    d = R.layer_data(layers[0])[case]
    labels = R.DATA[case]["labels"][test]
    pick = lambda pair: (pair[0][test], None if pair[1] is None else pair[1][test])
    photo_key, photo_skip = R.layer_data(layers[0])["photos"]
    before = (d["item_mod_top1"][test] != labels).sum().item()
    rows = {}
    for s in scales:
        e = {l: R.weight0(l) + s * dw for l, dw in edits.items()}
        after = (R.run_from(layers[0], *pick(d["item_mod"]), e).argmax(1) != labels).sum().item()
        clean = (R.run_from(layers[0], *pick(d["item_orig"]), e).argmax(1) == labels).float().mean().item()
        photos = (R.run_from(layers[0], photo_key, photo_skip, e).argmax(1) != R.layer_data(layers[0])["photos_top1"])
        rows[s] = (100 * max((before - after) / max(before, 1), -1), 100 * clean, 100 * photos.float().mean().item())
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="10,11")
    ap.add_argument("--lams", default="30,10")
    ap.add_argument("--mu", type=float, default=10)
    ap.add_argument("--items", default="40", help="training item pairs (40: the whole training half)")
    ap.add_argument("--one-texture", action="store_true")
    ap.add_argument("--unseen-textures", action="store_true")
    ap.add_argument("--objective", choices=["values", "logits"], default="values",
                    help="values: least_squares' (closed form); logits: fit_logits (one layer, lam weighs the KL)")
    ap.add_argument("--splits", type=int, default=6)
    ap.add_argument("--scales", default="0.35,0.5,0.7,1")
    ap.add_argument("--cases", default=",".join(R.CASES))
    args = ap.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    scales = [float(s) for s in args.scales.split(",")]
    R.DATA = R.build_cache()
    for case in args.cases.split(","):
        kept, masks = item_meta(case)
        labels = R.DATA[case]["labels"].tolist()
        classes = sorted(set(labels))
        for n in [int(x) for x in args.items.split(",")]:
            for lam in [float(x) for x in args.lams.split(",")]:
                rng = np.random.RandomState(0)  # the same halves and draws for every setting
                rows = {s: [] for s in scales}
                for _ in range(args.splits):
                    train_classes = set(rng.permutation(classes)[:len(classes) // 2].tolist())
                    train = [i for i, l in enumerate(labels) if l in train_classes]
                    test = [i for i, l in enumerate(labels) if l not in train_classes]
                    if args.unseen_textures:
                        styles = sorted({it["style"] for it in kept})
                        seen = set(rng.permutation(styles)[:len(styles) // 2].tolist())
                        train = [i for i in train if kept[i]["style"] in seen]
                        test = [i for i in test if kept[i]["style"] not in seen]
                    test = torch.tensor(test)
                    if args.one_texture:
                        style = kept[train[rng.randint(len(train))]]["style"]
                        train = [i for i in train if kept[i]["style"] == style]
                    train = torch.tensor(sorted(rng.permutation(train)[:n].tolist()))
                    edits = (fit_logits(layers[0], case, train, lam) if args.objective == "logits"
                             else fit(layers, case, train, masks, lam, args.mu))
                    for s, row in judge(layers, case, test, edits, scales).items():
                        rows[s].append(row)
                for s in scales:
                    a = np.array(rows[s])
                    setting = (" one texture" if args.one_texture else "") + (" unseen" if args.unseen_textures else "")
                    print(f"{case} layers {args.layers} items {n}{setting} "
                          f"lam {lam:g} s {s:<4}: corrected {a[:, 0].mean():5.1f} ± {a[:, 0].std():4.1f}  clean "
                          f"{a[:, 1].mean():5.1f}  photos changed {a[:, 2].mean():4.1f}", flush=True)


if __name__ == "__main__":
    main()
