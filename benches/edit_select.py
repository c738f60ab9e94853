"""Several exemplars as a validation set (prototype of `edit_gate.py`, the gated least-squares change at
`_blocks.10`): an edit from each exemplar alone, judged on the OTHER exemplars' re-textured copies (do they get
the answers the unedited model gives their originals?), and the best-judged one kept, against the joint edit
from all three and the edit from the first.

    .venv/bin/python benches/edit_select.py [--gain 3] [--cases road2snow]

Prints, per case, % errors corrected / clean originals kept / photos changed (means over the 5 stamps) of: the
first exemplar's edit, the joint edit, the edit the validation picks, the best of the three in hindsight.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import edit_gate as G  # noqa: E402
import edit_research as R  # noqa: E402

LAYERS = [10]


def gated_edit(case, ids, gain):
    delta = R.solve_multi(LAYERS[0], case, ids, layers=tuple(LAYERS), lam=30, mu=10)
    gate = G.fit_gate(LAYERS[0], case, ids, 0.99, 0.5)
    return {l: R.weight0(l) + gain * dw for l, dw in delta.items()}, gate


def answers(pair, edit):
    edits, gate = edit
    return G.batched(lambda k, s: G.logits(LAYERS, k, s, edits, gate), *pair)


def run_case(case, gain):
    data = R.DATA[case]
    ld = R.layer_data(LAYERS[0])
    d = ld[case]
    base_photos = ld["photos_top1"]
    table = {"first": [], "joint": [], "validated": [], "hindsight": []}
    for stamp in range(5):
        ids = [int(i) for i in (data["ex_stamp"] == stamp).nonzero()[:, 0]][:3]
        own = int(data["ex_label"][ids[0]])
        sel = (data["labels"] != own).nonzero()[:, 0]
        labels = data["labels"][sel]
        pick = lambda pair: (pair[0][sel], None if pair[1] is None else pair[1][sel])
        before = (d["item_mod_top1"][sel] != labels).sum().item()

        def judge(edit):
            after = (answers(pick(d["item_mod"]), edit).argmax(1) != labels).sum().item()
            clean = (answers(pick(d["item_orig"]), edit).argmax(1) == labels).float().mean().item()
            changed = (answers(ld["photos"], edit).argmax(1) != base_photos).float().mean().item()
            return 100 * max((before - after) / max(before, 1), -1), 100 * clean, 100 * changed

        singles, scores = [], []
        for i in ids:
            edit = gated_edit(case, [i], gain)
            others = [j for j in ids if j != i]
            modified, original, _ = R.exemplar_pairs(LAYERS[0], case, others)
            target = F.log_softmax(answers(original, ({}, None)), 1)
            kl = F.kl_div(F.log_softmax(answers(modified, edit), 1), target, log_target=True, reduction="batchmean")
            scores.append(kl.item())
            singles.append(judge(edit))
        joint = judge(gated_edit(case, ids, gain))
        chosen = min(range(3), key=lambda k: scores[k])
        best = max(range(3), key=lambda k: singles[k][0])
        print(f"  {case} stamp {stamp}: singles {[tuple(round(v, 1) for v in s) for s in singles]}, "
              f"validation KL {[round(s, 3) for s in scores]}, joint {tuple(round(v, 1) for v in joint)}", flush=True)
        for name, row in (("first", singles[0]), ("joint", joint), ("validated", singles[chosen]),
                          ("hindsight", singles[best])):
            table[name].append(row)
    for name, rows in table.items():
        t = torch.tensor(rows)
        mean, sd = t.mean(0), t.std(0)
        print(f"{case} {name:<10}: corrected {mean[0]:5.1f} ± {sd[0]:4.1f}, clean {mean[1]:5.1f}, "
              f"photos changed {mean[2]:4.1f}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gain", type=float, default=3.0)
    ap.add_argument("--cases", default=",".join(R.CASES))
    args = ap.parse_args()
    R.DATA = R.build_cache()
    for case in args.cases.split(","):
        run_case(case, args.gain)


if __name__ == "__main__":
    main()
