"""Where a gated rewrite's limit is: WHERE the change applies, or WHAT it maps the new concept to. On the kit's
items (the prototype of `edit_research.py`, one exemplar per stamp, layer `--layer`):

  1. the items' own original values put back at their re-textured ground (the item's mask at the layer's grid):
     what repairing the ground alone could correct at this layer;
  2. the solved `least_squares` change (`--kw`) behind the items' own ground mask (a perfect gate), behind its
     border cells alone (0.1 < m <= 0.5: the object's edge on the new ground) and behind the fitted gate
     (`edit_gate.py`'s, `--closed`:0.5), at scales 1, 2, 3; and the fitted gate's mean value on the items'
     ground, border and other cells;
  3. the exemplar's mean original value (or its mean original key through the conv) put at the ground instead;
  4. the keys' component in the r directions where the exemplar's modified keys differ most from its original
     ones (SVD of the differences) swapped for the original keys' mean there (r = 1..16), behind both gates.

    .venv/bin/python benches/edit_gate_ceiling.py --case road2snow [--layer 10] [--kw '{"lam":30,"mu":10}']

Prints % errors corrected and the gate's mean values (mean ± sd over the 5 stamps, items of other classes).
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import edit_gate as G  # noqa: E402
import edit_research as R  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="road2snow", choices=R.CASES)
    ap.add_argument("--layer", type=int, default=10)
    ap.add_argument("--kw", default='{"lam":30,"mu":10}')
    ap.add_argument("--closed", type=float, default=0.99, help="the fitted gate's shut quantile")
    args = ap.parse_args()
    case, L, kw = args.case, args.layer, json.loads(args.kw)
    R.DATA = R.build_cache()
    data, d = R.DATA[case], R.layer_data(L)[case]
    root = os.path.join(R.BENCH, case)
    items = json.load(open(os.path.join(root, "items.json")))
    masks = torch.stack([R.load_mask(os.path.join(root, "items", f"{items[int(i)]['id']:04d}_mask.png"))
                         for i in data["keep"]])
    (km, sm), (ko, so) = d["item_mod"], d["item_orig"]
    ground = F.adaptive_avg_pool2d(masks, km.shape[-2:])
    W = R.weight0(L)
    part = lambda s, idx: None if s is None else s[idx]

    def top1(sel, gate_of, value_of):
        """The items `sel` with `gate_of(idx, key)` blending the layer's output towards `value_of(idx, key, skip)`."""
        out = []
        for i in range(0, len(sel), 64):
            idx = sel[i:i + 64]
            k, s = km[idx], part(sm, idx)
            plain = R.block_post(L, k, s, W)
            g = gate_of(idx, k)
            x = g * value_of(idx, k, s) + (1 - g) * plain
            for j in range(L + 1, R.HEAD + 1):
                kk, ss = (x, None) if j == R.HEAD else R.block_pre(j, x)
                x = R.block_post(j, kk, ss, R.weight0(j))
            out.append(F.linear(x.mean((2, 3)), R.weight0(R.FC), R.MODEL._fc.bias).argmax(1))
        return torch.cat(out)

    cells = {"ground m>0.5": lambda m: m > 0.5, "ground m>0.1": lambda m: m > 0.1,
             "border 0.1<m<=0.5": lambda m: (m > 0.1) & (m <= 0.5)}
    gates = {f"items' {name}": lambda idx, k, inside=inside: inside(ground[idx]).float()
             for name, inside in cells.items()}
    gates["items' mask, soft"] = lambda idx, k: ground[idx]
    own_values = lambda idx, k, s: R.block_post(L, ko[idx], part(so, idx), W)
    results = {}
    for stamp in range(5):
        ids = [int(i) for i in (data["ex_stamp"] == stamp).nonzero()[:, 0]][:1]
        sel = (data["labels"] != int(data["ex_label"][ids[0]])).nonzero()[:, 0]
        labels = data["labels"][sel]
        before = (d["item_mod_top1"][sel] != labels).sum().item()
        record = lambda name, predicted: results.setdefault(name, []).append(
            100 * (before - (predicted != labels).sum().item()) / max(before, 1))
        for name, gate in gates.items():
            record(f"1. own original values at the {name}", top1(sel, gate, own_values))
        delta = R.solve_multi(L, case, ids, layers=(L,), **kw)[L]
        fitted = G.fit_gate(L, case, ids, args.closed, 0.5)
        opened, scored = G.gate_values(fitted, km[sel]), ground[sel]
        bands = {name: cells[name](scored) for name in ("ground m>0.5", "border 0.1<m<=0.5")}
        bands["other cells m<=0.1"] = ~cells["ground m>0.1"](scored)
        for band, inside in bands.items():
            results.setdefault(f"2g. the fitted gate's mean value on the items' {band}", []).append(
                opened[inside].mean().item())
        for name, gate in [("items' ground m>0.5", gates["items' ground m>0.5"]),
                           ("items' border 0.1<m<=0.5", gates["items' border 0.1<m<=0.5"]),
                           ("fitted gate", lambda idx, k: G.gate_values(fitted, k))]:
            for scale in (1, 2, 3):
                changed = lambda idx, k, s, w=W + scale * delta: R.block_post(L, k, s, w)
                record(f"2. solved change x{scale} behind the {name}", top1(sel, gate, changed))
        copies = torch.tensor([i * R.N_SOLVE_AUG + j for i in ids for j in range(R.N_SOLVE_AUG)])
        values, keys, new_values = [], [], []
        for pre, chosen in (("ex", torch.tensor(ids)), ("sa", copies)):
            k, s = d[pre + "_orig"][0][chosen], part(d[pre + "_orig"][1], chosen)
            m = R.flat(F.adaptive_avg_pool2d(data[pre + "_mask"][chosen], k.shape[-2:]))[:, 0] > 0.5
            values.append(R.flat(R.block_post(L, k, s, W))[m])
            keys.append(R.flat(k)[m])
            kn, sn = d[pre + "_mod"][0][chosen], part(d[pre + "_mod"][1], chosen)
            new_values.append(R.flat(R.block_post(L, kn, sn, W))[m])
        mean_value, mean_key = torch.cat(values).mean(0), torch.cat(keys).mean(0)
        shift = (mean_value - torch.cat(new_values).mean(0))[None, :, None, None]
        for name, gate in [("items' ground m>0.5", gates["items' ground m>0.5"]),
                           ("fitted gate", lambda idx, k: G.gate_values(fitted, k))]:
            for scale in (1, 2, 3):
                record(f"3s. each item's own value shifted by x{scale} the exemplar's mean old-new difference "
                       f"behind the {name}",
                       top1(sel, gate, lambda idx, k, s, scale=scale: R.block_post(L, k, s, W) + scale * shift))
        record("3. the exemplar's mean original value at the items' ground m>0.5",
               top1(sel, gates["items' ground m>0.5"],
                    lambda idx, k, s: mean_value[None, :, None, None].expand(k.shape[0], -1, *k.shape[-2:])))
        record("3. the exemplar's mean original key (own skip) at the items' ground m>0.5",
               top1(sel, gates["items' ground m>0.5"],
                    lambda idx, k, s: R.block_post(L, mean_key[None, :, None, None].expand_as(k), s, W)))
        differences = []
        for pre, chosen in (("ex", torch.tensor(ids)), ("sa", copies)):
            new, old = d[pre + "_mod"][0][chosen], d[pre + "_orig"][0][chosen]
            m = R.flat(F.adaptive_avg_pool2d(data[pre + "_mask"][chosen], new.shape[-2:]))[:, 0] > 0.5
            differences.append((R.flat(new) - R.flat(old))[m])
        directions = torch.linalg.svd(torch.cat(differences).double(), full_matrices=False)[2].float()
        for rank in (1, 4, 16):
            V = directions[:rank].T

            def swapped(idx, k, s, V=V):
                centred = k - mean_key[None, :, None, None]
                inside = torch.einsum("cr,nrhw->nchw", V, torch.einsum("cr,nchw->nrhw", V, centred))
                return R.block_post(L, k - inside, s, W)
            for name, gate in [("items' ground m>0.5", gates["items' ground m>0.5"]),
                               ("fitted gate", lambda idx, k: G.gate_values(fitted, k))]:
                record(f"4. rank-{rank} difference subspace swapped behind the {name}", top1(sel, gate, swapped))
    for name, values in results.items():
        t = torch.tensor(values)
        what = "mean" if name.startswith("2g.") else "corrected"
        print(f"{case} layer {L}: {name}: {what} {t.mean():5.2f} ± {t.std():4.2f}", flush=True)


if __name__ == "__main__":
    main()
