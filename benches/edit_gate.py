"""The gated rewrite in the prototype: the `least_squares` change of `edit_research.py` applied at a position
only where a linear gate on the conv's input opens (the service's `gated_least_squares`, src/edit/gate.rs).

    .venv/bin/python benches/edit_gate.py [--kw '{"layers":[10],"lam":30,"mu":10}'] [--scales 1,2,3,4]
        [--gates 0.98:0.5,0.99:0.5] [--no-statistics | --moment Z] [--smooth K]

A gate `closed:open` is shut below the `closed` quantile of the scores of the keys to leave alone (the
exemplar's original and its copies, the modified images' unmasked positions, and the kit's statistics images
unless --no-statistics) and fully open from the `open` quantile of the new concept's (the exemplar's masked
positions and its copies'); `closed:open:ridge` also sets the ridge added to the discriminant's pooled covariance,
relative to its mean eigenvalue (0.001, the service's, when absent). --moment Z replaces the statistics' keys by C in the covariance and a bound of Z
root-mean-square scores of C. --smooth K scores each position by its K x K neighbourhood's mean score, the
bounds being quantiles of the smoothed maps (a coherent region of the new concept against isolated ordinary keys
that score high). Scales multiply the solved change. Prints % corrected, clean originals kept and
photos changed per (gate, scale), means over the 5 stamps, one exemplar each. With several layers, the first
layer's gate is used at the others of the same grid only.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import edit_research as R  # noqa: E402


def fit_gate(L, case, idx, closed_q, open_q, ridge=1e-3, statistics=True, moment=None, extra=()):
    """`extra`: more (modified keys, original keys, masks) of the new concept, beside the exemplars' and their
    copies'; `ridge`: added to the pooled covariance, relative to its mean eigenvalue."""
    ld = R.layer_data(L)[case]
    data = R.DATA[case]
    copies = torch.tensor([i * R.N_SOLVE_AUG + j for i in idx for j in range(R.N_SOLVE_AUG)])
    sets = [(ld[pre + "_mod"][0][sel], ld[pre + "_orig"][0][sel], data[pre + "_mask"][sel])
            for pre, sel in (("ex", torch.tensor(idx)), ("sa", copies))]
    stats = R.keys_at(L, R.DATA["stats"])[0].double() if statistics else None
    maps = []
    for new, old, mask in [*sets, *extra]:
        new = new.double()
        maps.append((new, old.double(), R.flat(F.adaptive_avg_pool2d(mask, new.shape[-2:]).double())[:, 0]))

    def split(per_position):
        """per_position (N x C x H x W keys -> rows) of the new concept's positions and of the keys to leave alone."""
        on = [per_position(new)[m > 0.5] for new, _, m in maps]
        off = [rows for new, old, m in maps for rows in (per_position(old), per_position(new)[m < 0.1])]
        return torch.cat(on), torch.cat(off + ([per_position(stats)] if statistics else []))

    P, N = split(R.flat)
    S = torch.cov(P.T) + torch.cov(N.T)
    C = R.layer_data(L)["C"]
    if moment is not None:
        S = S + C
    S = S + ridge * torch.trace(S) / S.shape[0] * torch.eye(S.shape[0], dtype=S.dtype)
    w = torch.linalg.solve(R.floored(S), P.mean(0) - N.mean(0))
    # The bounds are quantiles of the scores as gate_values computes them (smoothed with --smooth).
    score = lambda keys: R.flat(smoothed(torch.einsum("c,nchw->nhw", w, keys)[:, None]))[:, 0]
    on, off = split(score)
    closed = torch.quantile(off, closed_q).item()
    if moment is not None:
        closed = max(closed, moment * (w @ C @ w).sqrt().item())
    return w.float(), closed, max(torch.quantile(on, open_q).item(), closed + 1e-6)


def gate_values(gate, key):
    """A gate, or the union (largest value) of a list of gates."""
    if isinstance(gate, list):
        return torch.stack([gate_values(g, key) for g in gate]).amax(0)
    w, closed, open_ = gate
    return ((smoothed(torch.einsum("c,nchw->nhw", w, key)[:, None]) - closed) / (open_ - closed)).clamp(0, 1)


SMOOTH = 1


def smoothed(score):
    """An N x 1 x H x W score map averaged over SMOOTH x SMOOTH neighbourhoods (--smooth; 1: as it is)."""
    if SMOOTH == 1:
        return score
    return F.avg_pool2d(score, SMOOTH, stride=1, padding=SMOOTH // 2, count_include_pad=False)


def logits(layers, key, skip, edits, gate):
    """`edits` (layer -> weight) behind `gate`, or a list of (edits, gate) pairs whose changes add up."""
    return head(features(layers, key, skip, edits, gate))


def head(x):
    """The classifier on the last conv's output."""
    return F.linear(x.mean((2, 3)), R.weight0(R.FC), R.MODEL._fc.bias)


def features(layers, key, skip, edits, gate):
    """The last conv's output (N x 1280 x 7 x 7) under `logits`' edits."""
    pairs = edits if isinstance(edits, list) else [(edits, gate)]
    x, gs = None, [None] * len(pairs)
    for j in range(layers[0], R.HEAD + 1):
        k, s = (key, skip) if j == layers[0] else ((x, None) if j == R.HEAD else R.block_pre(j, x))
        x = R.block_post(j, k, s, R.weight0(j))
        base = x
        for p, (e, g) in enumerate(pairs):
            if j in e:
                if gs[p] is None:
                    gs[p] = torch.ones_like(x[:, :1]) if g is None else gate_values(g, k)
                if gs[p].shape[-2:] == x.shape[-2:]:
                    x = x + gs[p] * (R.block_post(j, k, s, e[j]) - base)
    return x


def batched(fn, key, skip, size=64):
    return torch.cat([fn(key[i:i + size], None if skip is None else skip[i:i + size])
                      for i in range(0, key.shape[0], size)])


def judged(run, pick, d, labels, before, photos, base_photos):
    """(% errors corrected, % clean originals kept, % photos changed) of an edited model's top-1 `run(pair)`: on the
    picked items' re-textured copies (`before` errors unedited), their originals, and the photos."""
    after = (run(pick(d["item_mod"])) != labels).sum().item()
    clean = (run(pick(d["item_orig"])) == labels).float().mean().item()
    changed = (run(photos) != base_photos).float().mean().item()
    return 100 * max((before - after) / max(before, 1), -1), 100 * clean, 100 * changed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kw", default='{"layers":[10],"lam":30,"mu":10}')
    ap.add_argument("--scales", default="1,2,3,4")
    ap.add_argument("--gates", default="0.98:0.5,0.99:0.5", help="closed:open quantiles[:ridge]; 'none' for no gate")
    ap.add_argument("--no-statistics", action="store_true")
    ap.add_argument("--moment", type=float)
    ap.add_argument("--smooth", type=int, default=1,
                    help="the gate scores a position by its SMOOTH x SMOOTH neighbourhood's mean score (odd)")
    ap.add_argument("--exemplars", type=int, default=1, help="compositions of the stamp used (1 or 3)")
    ap.add_argument("--union", choices=["none", "gates", "changes"], default="none",
                    help="several exemplars: one solve behind the union of a gate per exemplar (gates), or a "
                         "solve and a gate per exemplar, the changes added up (changes)")
    args = ap.parse_args()
    global SMOOTH
    SMOOTH = args.smooth
    kw = json.loads(args.kw)
    layers = tuple(kw.pop("layers"))
    scales = [float(s) for s in args.scales.split(",")]
    gates = [None if g == "none" else tuple(float(q) for q in g.split(":")) for g in args.gates.split(",")]
    R.DATA = R.build_cache()
    for case in R.CASES:
        data = R.DATA[case]
        d = R.layer_data(layers[0])[case]
        photos = R.layer_data(layers[0])["photos"]
        base_photos = batched(lambda k, s: logits(layers, k, s, {}, None), *photos).argmax(1)
        results = {}
        for stamp in range(5):
            ids = [int(i) for i in (data["ex_stamp"] == stamp).nonzero()[:, 0]][:args.exemplars]
            sel = (data["labels"] != int(data["ex_label"][ids[0]])).nonzero()[:, 0]
            labels = data["labels"][sel]
            pick = lambda pair: (pair[0][sel], None if pair[1] is None else pair[1][sel])
            groups = [[i] for i in ids] if args.union == "changes" else [ids]
            deltas = [R.solve_multi(layers[0], case, g, layers=layers, **kw) for g in groups]
            before = (d["item_mod_top1"][sel] != labels).sum().item()
            for quantiles in gates:
                fit = lambda g: fit_gate(layers[0], case, g, *quantiles, statistics=not args.no_statistics,
                                         moment=args.moment)
                if quantiles is None:
                    gs = [None] * len(groups)
                elif args.union == "gates":
                    gs = [[fit([i]) for i in ids]]
                else:
                    gs = [fit(g) for g in groups]
                for s in scales:
                    edits = [({l: R.weight0(l) + s * dw for l, dw in delta.items()}, g) for delta, g in zip(deltas, gs)]
                    run = lambda pair: batched(lambda k, sk: logits(layers, k, sk, edits, None), *pair).argmax(1)
                    results.setdefault((quantiles, s), []).append(
                        judged(run, pick, d, labels, before, photos, base_photos))
        for (quantiles, s), values in results.items():
            t = torch.tensor(values)
            mean, sd = t.mean(0), t.std(0)
            print(f"{case} gate {quantiles} scale {s}: corrected {mean[0]:5.1f} ± {sd[0]:4.1f}, "
                  f"clean {mean[1]:5.1f}, photos changed {mean[2]:4.1f}", flush=True)


if __name__ == "__main__":
    main()
