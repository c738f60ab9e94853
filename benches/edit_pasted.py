"""Pasted scenes in the gated least-squares solve (prototype of `edit_gate.py`): statistics photos with a
transformed copy of the exemplar's ground pasted over them, once in the new concept and once in the old
(`edit_answers.pasted`), add key/value pairs where the new concept borders other content. Their new-concept
keys are mapped to their old-concept values in the solve (`--into solve`), join the new concept's side of the
gate's fit (`gate`), or both; measured against neither, one exemplar (composition 0) per stamp.

    .venv/bin/python benches/edit_pasted.py [--layer 10] [--pasted 24] [--into none,solve,gate,both]
        [--gate 0.995:0.5] [--scales 1,2,3]

Prints % corrected, clean originals kept and photos changed per (setting, scale), means over the 5 stamps.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import edit_answers as A  # noqa: E402
import edit_gate as G  # noqa: E402
import edit_research as R  # noqa: E402

# (layer, case, exemplar ids) -> pasted scenes' ((new key, skip), (old key, skip), masks) that gather adds.
PASTED = {}
gather_exemplars = R.gather


def gather_with_pasted(L, case, idx, use_aug, *args, **kw):
    """`edit_research.gather` with the pasted scenes' masked positions appended, where PASTED holds them."""
    g = gather_exemplars(L, case, idx, use_aug, *args, **kw)
    extra = PASTED.get((L, case, tuple(idx)))
    if extra is None:
        return g
    rows = R.masked_rows(L, *extra)
    return {name: torch.cat([g[name], rows[name]]) for name in g}


R.gather = gather_with_pasted


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layer", type=int, default=10)
    ap.add_argument("--pasted", type=int, default=24, help="scenes per exemplar")
    ap.add_argument("--into", default="none,solve,gate,both")
    ap.add_argument("--gate", default="0.995:0.5")
    ap.add_argument("--scales", default="1,2,3")
    ap.add_argument("--cases", default=",".join(R.CASES))
    args = ap.parse_args()
    layer, layers = args.layer, (args.layer,)
    closed, open_ = (float(q) for q in args.gate.split(":"))
    scales = [float(s) for s in args.scales.split(",")]
    R.DATA = R.build_cache()
    for case in args.cases.split(","):
        data = R.DATA[case]
        d = R.layer_data(layer)[case]
        photos = R.layer_data(layer)["photos"]
        base_photos = G.batched(lambda k, s: G.logits(layers, k, s, {}, None), *photos).argmax(1)
        results = {}
        for stamp in range(5):
            ids = [int(i) for i in (data["ex_stamp"] == stamp).nonzero()[:, 0]][:1]
            sel = (data["labels"] != int(data["ex_label"][ids[0]])).nonzero()[:, 0]
            labels = data["labels"][sel]
            pick = lambda pair: (pair[0][sel], None if pair[1] is None else pair[1][sel])
            before = (d["item_mod_top1"][sel] != labels).sum().item()
            scenes = A.pasted(layer, case, ids, args.pasted)
            extra = [(scenes[0][0], scenes[1][0], scenes[2])]
            for into in args.into.split(","):
                if into in ("solve", "both"):
                    PASTED[(layer, case, tuple(ids))] = scenes
                delta = R.solve_cov(layer, case, ids, lam=30, mu=10)
                PASTED.clear()
                gate = G.fit_gate(layer, case, ids, closed, open_, extra=extra if into in ("gate", "both") else ())
                for s in scales:
                    edits = {layer: R.weight0(layer) + s * delta[layer]}
                    run = lambda pair: G.batched(lambda k, sk: G.logits(layers, k, sk, edits, gate), *pair).argmax(1)
                    results.setdefault((into, s), []).append(
                        G.judged(run, pick, d, labels, before, photos, base_photos))
        for (into, s), values in results.items():
            t = torch.tensor(values)
            mean, sd = t.mean(0), t.std(0)
            print(f"{case} pasted into {into:5s} scale {s}: corrected {mean[0]:5.1f} ± {sd[0]:4.1f} "
                  f"({' / '.join(f'{v:.1f}' for v in t[:, 0].tolist())}), clean {mean[1]:5.1f}, "
                  f"photos changed {mean[2]:4.1f}", flush=True)


if __name__ == "__main__":
    main()
