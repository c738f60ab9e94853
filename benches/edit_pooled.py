"""Prototype: an edit on the pooled features (the classifier's input) instead of a conv inside the body.

    EDITSERVE_PROTOTYPE_VIEW=service .venv/bin/python benches/edit_pooled.py [--alphas 1,2] [--dirs 1,4]

From one exemplar and its transformed copies, the new concept's shift of the pooled features (modified minus
original) gives directions; every image's component along them beyond what the images to leave alone reach
(their 0.995 quantile) is taken off, times alpha. Clean images sit below that bound, so they stay as they are.
Reports the protocol's figures (bench-dev README) unguarded, and the share of the prototype's guard check images
(edit_research.py) whose top-1 changes; last, how the items' own shifts line up with an exemplar's.
"""
import argparse

import numpy as np
import torch
import torch.nn.functional as F

import edit_research as R

torch.set_num_threads(2)


def flat(pair):
    """Pooled features (N x 1280 x 1 x 1 keys at the classifier) as N x 1280 float64 rows."""
    return pair[0][:, :, 0, 0].double()


def directions(case, idx, k):
    """The top k right singular vectors of the exemplars' shifts (modified minus original, over the exemplars and
    their transformed copies), each pointing along the mean shift, and the 0.995 quantile of the projections of
    the images to leave alone (the originals' copies and the statistics set) on each."""
    d = R.layer_data(R.FC)[case]
    ids = torch.tensor([i * R.N_SOLVE_AUG + j for i in idx for j in range(R.N_SOLVE_AUG)])
    original = torch.cat([flat(d["ex_orig"])[idx], flat(d["sa_orig"])[ids]])
    shift = torch.cat([flat(d["ex_mod"])[idx], flat(d["sa_mod"])[ids]]) - original
    dirs = torch.linalg.svd(shift, full_matrices=False)[2][:k]
    dirs = dirs * torch.sign(dirs @ shift.mean(0))[:, None]
    bound = torch.quantile(torch.cat([original, STATS]) @ dirs.T, 0.995, dim=0)
    return dirs, bound, shift


def debias(f, dirs, bound, alpha):
    p = f @ dirs.T
    excess = (p - bound).clamp_min(0)
    return f - alpha * excess @ dirs


def logits(f):
    return F.linear(f.float(), R.MODEL._fc.weight, R.MODEL._fc.bias)


def evaluate(case, idx, label, dirs, bound, alpha):
    ld = R.layer_data(R.FC)
    d = ld[case]
    C = R.DATA[case]
    other = C["labels"] != label
    lab = C["labels"][other]
    fi, fo = flat(d["item_mod"])[other], flat(d["item_orig"])[other]
    pre_err = (logits(fi).argmax(1) != lab).sum().item()
    post_err = (logits(debias(fi, dirs, bound, alpha)).argmax(1) != lab).sum().item()
    clean = 100.0 * (logits(debias(fo, dirs, bound, alpha)).argmax(1) == lab).float().mean().item()
    fp = flat(ld["photos"])
    photos = 100.0 * (logits(debias(fp, dirs, bound, alpha)).argmax(1) != logits(fp).argmax(1)).float().mean().item()
    ex_guard = torch.tensor([i * R.N_GUARD_AUG + j for i in idx for j in range(R.N_GUARD_AUG)])
    fg = torch.cat([flat(d["guard"])[ex_guard], flat(ld["natural"])])
    guard = (logits(debias(fg, dirs, bound, alpha)).argmax(1) != logits(fg).argmax(1)).float().mean().item()
    corr = 100.0 * max((pre_err - post_err) / max(pre_err, 1), -1.0)
    return dict(corr=corr, clean=clean, photos=photos, guard=100 * guard)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--alphas", default="1,2,3")
    ap.add_argument("--dirs", default="1,2,4,8")
    ap.add_argument("--cases", default="road2snow,grass2sand")
    ap.add_argument("--exemplars", type=int, default=1)
    args = ap.parse_args()
    R.DATA = R.build_cache()
    global STATS
    k, _ = R.keys_at(R.FC, R.DATA["stats"])
    STATS = k[:, :, 0, 0].double()
    for case in args.cases.split(","):
        C = R.DATA[case]
        d = R.layer_data(R.FC)[case]
        for k in [int(x) for x in args.dirs.split(",")]:
            for alpha in [float(a) for a in args.alphas.split(",")]:
                res = []
                for stamp in range(5):
                    ids = [int(i) for i in (C["ex_stamp"] == stamp).nonzero()[:, 0]][: args.exemplars]
                    label = int(C["ex_label"][ids[0]])
                    dirs, bound, _ = directions(case, ids, k)
                    res.append(evaluate(case, ids, label, dirs, bound, alpha))
                g = lambda key: np.array([r[key] for r in res])
                print(f"{case} dirs={k} alpha={alpha}: corr {g('corr').mean():5.1f} ± {g('corr').std():4.1f} "
                      f"({' '.join(f'{x:.1f}' for x in g('corr'))}) clean {g('clean').mean():5.1f} "
                      f"photos {g('photos').mean():4.1f} guard {g('guard').mean():4.1f}", flush=True)
        # Do other objects shift the same way? Each item's shift against stamp 0's exemplar's mean shift.
        ids = [int((C["ex_stamp"] == 0).nonzero()[0, 0])]
        m = directions(case, ids, 1)[2].mean(0)
        items = flat(d["item_mod"]) - flat(d["item_orig"])
        cos = F.cosine_similarity(items, m[None], dim=1)
        print(f"{case}: items' shift vs stamp 0's mean shift: cos {cos.mean():.2f} ± {cos.std():.2f}; "
              f"norm ratio {(items.norm(dim=1) / m.norm()).mean():.2f}", flush=True)


if __name__ == "__main__":
    main()
