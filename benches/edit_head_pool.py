"""An edit after the last conv: what the head's 7 x 7 features (the classifier's input before pooling) could do
for the kit's re-textured items, with a perfect gate (each item's own ground mask, pooled to 7 x 7).

    EDITSERVE_PROTOTYPE_VIEW=service .venv/bin/python benches/edit_head_pool.py

Per case, % errors corrected on items of classes other than each stamp's (mean ± sd over the 5 stamps, the
prototype of `edit_research.py`): the ground's cells left out of the pooling (> 0.5 or > 0.1 of a cell), weighted
by 1 - mask, the original's features put back at the ground (the ceiling), and, from the stamp's exemplar
(composition 0), its mean original ground feature put at the items' ground, or its mean shift (original minus
modified, over its masked cells) added there (x 0.5, x 1) or everywhere.
"""
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import edit_research as R  # noqa: E402


def head_features(x_first):
    """Input of block FIRST -> the head's activated output (N x 1280 x 7 x 7)."""
    out = []
    for s in range(0, x_first.shape[0], 64):
        key, _ = R.keys_at(R.HEAD, x_first[s:s + 64])
        out.append(R.block_post(R.HEAD, key, None, R.weight0(R.HEAD)))
    return torch.cat(out)


def top1(pooled):
    return F.linear(pooled, R.weight0(R.FC), R.MODEL._fc.bias).argmax(1)


def left_out(features, keep):
    return (features * keep).sum((2, 3)) / keep.sum((2, 3)).clamp(min=1e-3)


def main():
    R.DATA = R.build_cache()
    for case in R.CASES:
        data = R.DATA[case]
        root = os.path.join(R.BENCH, case)
        items = json.load(open(os.path.join(root, "items.json")))
        masks = torch.stack([R.load_mask(os.path.join(root, "items", f"{items[int(i)]['id']:04d}_mask.png"))
                             for i in data["keep"]])
        modified, original = head_features(data["item_mod"]), head_features(data["item_orig"])
        mask = F.adaptive_avg_pool2d(masks, modified.shape[-2:])
        ground = mask > 0.5
        ex_orig, ex_mod = head_features(data["ex_orig"]), head_features(data["ex_mod"])
        ex_ground = F.adaptive_avg_pool2d(data["ex_mask"], ex_orig.shape[-2:]) > 0.5
        labels = data["labels"]
        results = {}
        for stamp in range(5):
            e = int((data["ex_stamp"] == stamp).nonzero()[0, 0])
            sel = (labels != int(data["ex_label"][e])).nonzero()[:, 0]
            m, g, x = mask[sel], ground[sel], modified[sel]
            before = (top1(x.mean((2, 3))) != labels[sel]).sum().item()
            cells = ex_ground[e, 0]
            mean_orig, mean_mod = ex_orig[e][:, cells].mean(1), ex_mod[e][:, cells].mean(1)
            shift = (mean_orig - mean_mod)[None, :, None, None]
            pooled = {
                "ground (> 0.5) left out of the pooling": left_out(x, (m <= 0.5).float()),
                "ground and border (> 0.1) left out": left_out(x, (m <= 0.1).float()),
                "cells weighted by 1 - mask": left_out(x, 1 - m),
                "the original's features at the ground (ceiling)": torch.where(g, original[sel], x).mean((2, 3)),
                "the exemplar's mean original ground feature at the ground":
                    torch.where(g, mean_orig[None, :, None, None], x).mean((2, 3)),
                "the exemplar's mean shift x 0.5 at the ground": torch.where(g, x + 0.5 * shift, x).mean((2, 3)),
                "the exemplar's mean shift x 1 at the ground": torch.where(g, x + shift, x).mean((2, 3)),
                "the exemplar's mean shift x 1 everywhere": (x + shift).mean((2, 3)),
            }
            for name, p in pooled.items():
                after = (top1(p) != labels[sel]).sum().item()
                # The protocol's floor: an edit is charged at most all of the errors it started from.
                results.setdefault(name, []).append(max(100 * (before - after) / max(before, 1), -100.0))
        for name, values in results.items():
            t = torch.tensor(values)
            print(f"{case}: {name}: corrected {t.mean():6.1f} ± {t.std():4.1f}", flush=True)


if __name__ == "__main__":
    main()
