"""The gated change fitted on the classifier's answers instead of the layer's values (prototype of
`edit_research.py` / `edit_gate.py`): behind the fitted gate, a change of the edited conv(s) is trained by
gradient descent so that the exemplar's re-textured copies get the answers the unedited model gives their
originals, the originals' copies keeping theirs.

    .venv/bin/python benches/edit_answers.py [--objective kl|kl_other|features] [--exemplars 1|3]
        [--layers 10] [--steps 60] [--lr 1e-3] [--lam 1] [--copies 24] [--init zero|least_squares] [--cases grass2sand]
        [--pasted N] [--closed 0.99]

Objectives: `kl` the whole answer (the exemplar's own class included: it also teaches "this ground means a
fire engine"); `kl_other` the answer over the other classes only, each side renormalised (what the new
ground adds or takes away, whatever the object); `features` the last conv's features at the ground positions
(the mask pooled to 7x7) of the re-textured copies should be the originals'. Prints % errors corrected, clean
originals kept and photos changed (means over the 5 stamps) under the product's guard (largest scale in
edit_research.GRID with at most 2% of the check set's top-1 changed) and at scale 1. `--pasted N` adds N scenes per
exemplar to the fit: statistics photos with a transformed copy of the exemplar's ground pasted over them.
"""
import argparse
import glob
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import edit_gate as G  # noqa: E402
import edit_research as R  # noqa: E402


def pasted(layer, case, ids, count):
    """(key, skip) pairs at `layer` of `count` scenes per exemplar: a statistics photo with the exemplar's ground
    (a transformed copy of it) pasted over it, in the new concept and in the old, and the pasted masks: other
    content beside the new concept, from the exemplar and the statistics set alone."""
    images = list(R.exemplar_images(case))
    photos = sorted(glob.glob(os.path.join(R.BENCH, "stats", "*.png")))
    gen = torch.Generator().manual_seed(5 + 1000 * ids[0])
    new, old, masks = [], [], []
    for i in ids:
        o, m, k = images[i]
        for p, j in zip(R.aug_params(gen, count), torch.randperm(len(photos), generator=gen)[:count].tolist()):
            photo, mask = R.load_rgb(photos[j]), R.apply_aug(k, p)
            new.append(photo * (1 - mask) + R.apply_aug(m, p) * mask)
            old.append(photo * (1 - mask) + R.apply_aug(o, p) * mask)
            masks.append(mask)
    return R.image_keys(layer, new), R.image_keys(layer, old), torch.stack(masks)


def fit(layers, case, ids, gate, args, own):
    modified, original, masks = R.exemplar_pairs(layers[0], case, ids, args.copies)
    if args.pasted:
        join = lambda a, b: tuple(None if x is None else torch.cat([x, y]) for x, y in zip(a, b))
        new, old, more = pasted(layers[0], case, ids, args.pasted)
        modified, original, masks = join(modified, new), join(original, old), torch.cat([masks, more])
    base_feat = G.features(layers, *original, {}, None)
    base = F.log_softmax(G.head(base_feat), 1)
    ground = F.adaptive_avg_pool2d(masks, base_feat.shape[-2:])
    if args.init == "least_squares":
        init = R.solve_multi(layers[0], case, ids, layers=tuple(layers), lam=30, mu=10)
        deltas = {l: (3.0 * init[l]).clone().requires_grad_(True) for l in layers}
    else:
        deltas = {l: torch.zeros_like(R.weight0(l), requires_grad=True) for l in layers}
    optimiser = torch.optim.Adam(list(deltas.values()), lr=args.lr)
    others = torch.ones(base.shape[1], dtype=torch.bool)
    others[own] = False

    def kl(out, target, keep=None):
        logp = F.log_softmax(out, 1)
        if keep is not None:
            logp, target = logp[:, keep].log_softmax(1), target[:, keep].log_softmax(1)
        return F.kl_div(logp, target, log_target=True, reduction="batchmean")

    with torch.enable_grad():
        for _ in range(args.steps):
            edits = {l: R.weight0(l) + dw for l, dw in deltas.items()}
            x = G.features(layers, *modified, edits, gate)
            if args.objective == "features":
                fit_loss = ((x - base_feat) ** 2 * ground).sum() / (ground.sum() * x.shape[1])
            else:
                fit_loss = kl(G.head(x), base, others if args.objective == "kl_other" else None)
            keep_loss = kl(G.logits(layers, *original, edits, gate), base)
            loss = fit_loss + args.lam * keep_loss
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return {l: dw.detach() for l, dw in deltas.items()}


def run_case(case, args):
    layers = args.layers
    data = R.DATA[case]
    ld = R.layer_data(layers[0])
    d = ld[case]
    batched = lambda fn, pair: G.batched(fn, *pair)
    base_photos = batched(lambda k, s: G.logits(layers, k, s, {}, None), ld["photos"]).argmax(1)
    rows = []
    for stamp in range(5):
        ids = [int(i) for i in (data["ex_stamp"] == stamp).nonzero()[:, 0]][:args.exemplars]
        own = int(data["ex_label"][ids[0]])
        gate = G.fit_gate(layers[0], case, ids, args.closed, 0.5)
        t0 = time.time()
        deltas = fit(layers, case, ids, gate, args, own)
        seconds = time.time() - t0
        sel = (data["labels"] != own).nonzero()[:, 0]
        labels = data["labels"][sel]
        pick = lambda pair: (pair[0][sel], None if pair[1] is None else pair[1][sel])
        check_ids = torch.tensor([i * R.N_GUARD_AUG + j for i in ids for j in range(R.N_GUARD_AUG)])
        check = (torch.cat([d["guard"][0][check_ids], ld["natural"][0]]),
                 None if d["guard"][1] is None else torch.cat([d["guard"][1][check_ids], ld["natural"][1]]))
        check_top = torch.cat([d["guard_top1"][check_ids], ld["natural_top1"]])

        def top1(pair, s):
            edits = {l: R.weight0(l) + s * dw for l, dw in deltas.items()}
            return batched(lambda k, sk: G.logits(layers, k, sk, edits, gate), pair).argmax(1)

        guarded = next(s for s in R.GRID if s == 0.0 or
                       (top1(check, s) != check_top).sum().item() <= 0.02 * check_top.shape[0])
        before = (d["item_mod_top1"][sel] != labels).sum().item()
        row = []
        for s in (guarded, 1.0):
            after = (top1(pick(d["item_mod"]), s) != labels).sum().item()
            clean = (top1(pick(d["item_orig"]), s) == labels).float().mean().item()
            changed = (top1(ld["photos"], s) != base_photos).float().mean().item()
            row.append((100 * max((before - after) / max(before, 1), -1), 100 * clean, 100 * changed, s))
        print(f"  {case} stamp {stamp}: guarded {row[0]}, scale 1 {row[1]}, fit {seconds:.1f}s", flush=True)
        rows.append(row)
    t = torch.tensor(rows)
    mean, sd = t.mean(0), t.std(0)
    for i, what in enumerate(("guarded", "scale 1")):
        print(f"{case} ex={args.exemplars} {args.objective} {what}: corrected {mean[i, 0]:5.1f} ± {sd[i, 0]:4.1f}, "
              f"clean {mean[i, 1]:5.1f}, photos changed {mean[i, 2]:4.1f}, scale {mean[i, 3]:.2f}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--objective", choices=["kl", "kl_other", "features"], default="kl_other")
    ap.add_argument("--exemplars", type=int, default=1)
    ap.add_argument("--layers", default="10")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--copies", type=int, default=R.N_SOLVE_AUG, help="transformed copies per exemplar")
    ap.add_argument("--pasted", type=int, default=0,
                    help="scenes per exemplar: statistics photos with the exemplar's ground pasted over them")
    ap.add_argument("--closed", type=float, default=0.99, help="the gate's shut quantile")
    ap.add_argument("--init", choices=["zero", "least_squares"], default="zero")
    ap.add_argument("--cases", default=",".join(R.CASES))
    args = ap.parse_args()
    args.layers = [int(x) for x in args.layers.split(",")]
    R.DATA = R.build_cache()
    print(vars(args), flush=True)
    for case in args.cases.split(","):
        run_case(case, args)


if __name__ == "__main__":
    main()
