"""Where a prototype edit corrects and where it breaks: the two-layer `least_squares` change of
`edit_research.py` (one exemplar per stamp) applied everywhere, only at the kit items' ground positions (their
concept mask, pooled to the layer's grid) or only at the other positions (the object and its surround), with the
items that break and their top-2 probability margin under the unedited model.

    .venv/bin/python benches/edit_where.py [--scales 0.5,1] [--kw '{"layers":[10,11],"lam":30,"mu":10}']

A weight edit cannot choose its positions: this only says which part of the change does the work and which part
does the harm.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import edit_ceiling  # noqa: E402
import edit_research as R  # noqa: E402


def logits_where(layers, key, skip, edits, mask, where):
    """Logits with the edited layers' outputs taken from the edited weights only where `where` says."""
    gate = {"everywhere": lambda m: torch.ones_like(m), "ground": lambda m: m, "object": lambda m: 1 - m}[where]
    x = None
    for j in range(layers[0], R.HEAD + 1):
        k, s = (key, skip) if j == layers[0] else ((x, None) if j == R.HEAD else R.block_pre(j, x))
        x = R.block_post(j, k, s, R.weight0(j))
        if j in edits:
            w = gate(F.adaptive_avg_pool2d(mask, x.shape[-2:]))
            x = w * R.block_post(j, k, s, edits[j]) + (1 - w) * x
    return F.linear(x.mean((2, 3)), R.weight0(R.FC), R.MODEL._fc.bias)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kw", default='{"layers":[10,11],"lam":30,"mu":10}')
    ap.add_argument("--scales", default="0.5,1")
    args = ap.parse_args()
    kw = json.loads(args.kw)
    layers = tuple(kw.pop("layers"))
    R.DATA = R.build_cache()
    for case in R.CASES:
        data = R.DATA[case]
        _, masks = edit_ceiling.item_meta(case)
        d = R.layer_data(layers[0])[case]
        for stamp in range(5):
            ids = [int(i) for i in (data["ex_stamp"] == stamp).nonzero()[:, 0]][:1]
            sel = (data["labels"] != int(data["ex_label"][ids[0]])).nonzero()[:, 0]
            labels, m = data["labels"][sel], masks[sel]
            pick = lambda pair: (pair[0][sel], None if pair[1] is None else pair[1][sel])
            delta = R.solve_multi(layers[0], case, ids, layers=layers, **kw)
            base = logits_where(layers, *pick(d["item_orig"]), {}, m, "everywhere").softmax(1)
            top2 = base.topk(2, 1).values
            margin = top2[:, 0] - top2[:, 1]
            before = (d["item_mod_top1"][sel] != labels).sum().item()
            line = f"{case} stamp {stamp}:"
            for s in [float(x) for x in args.scales.split(",")]:
                edits = {l: R.weight0(l) + s * dw for l, dw in delta.items()}
                for where in ("everywhere", "ground", "object"):
                    after = (logits_where(layers, *pick(d["item_mod"]), edits, m, where).argmax(1) != labels).sum().item()
                    broke = logits_where(layers, *pick(d["item_orig"]), edits, m, where).argmax(1) != labels
                    line += (f" | s {s} {where}: corrected {100 * max((before - after) / max(before, 1), -1):5.1f}"
                             f" broke {broke.sum().item()}")
                    if where == "everywhere":
                        margins = ", ".join(f"{v:.3f}" for v in margin[broke].tolist())
                        line += f" (margins {margins})"
            print(line + f" | median margin {margin.median().item():.2f}", flush=True)


if __name__ == "__main__":
    main()
