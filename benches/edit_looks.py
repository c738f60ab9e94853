"""Other looks of the new concept for the gate (prototype of `edit_gate.py`, the gated least-squares change at
one layer, gain 3): does the gate open wider on the items' new concept when its fit also sees recoloured copies
of the exemplar's (saturation, contrast, brightness, a colour cast, sometimes a blur, inside the mask), or when
it opens more steeply above its shut bound? One exemplar, from each of the kit's 15 exemplar images.

    .venv/bin/python benches/edit_looks.py [--cases road2snow] [--gates plain,looks,plain:0.25,looks:0.25]

A gate `plain` is edit_gate's (shut at the 0.99 quantile of the keys to leave alone, fully open from the median
of the new concept's); `looks` adds 24 recoloured copies per exemplar to its fit; `:F` moves the fully-open
bound to F of the way from the shut one. Prints, per case and gate, % errors corrected / clean originals kept /
photos changed and the mean gate value over the items' re-textured ground and over their originals' ground, per
composition and over all 15 images, and the paired difference of each gate against `plain`.
"""
import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import edit_gate as G  # noqa: E402
import edit_research_curve as C  # noqa: E402
import edit_research as R  # noqa: E402

COPIES = 24
GAIN = 3.0


def recolour(modified, mask, gen):
    """The concept (mask) of a modified image (3 x 224 x 224 pixels) in another colouring."""
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(1, generator=gen).item()
    grey = modified.mean(0, keepdim=True)
    t = grey + (modified - grey) * math.exp(u(-0.5, 0.5))
    centre = (modified * mask).sum() / (3 * mask.sum().clamp_min(1))
    t = centre + (t - centre) * math.exp(u(-0.4, 0.4))
    t = t * math.exp(u(-0.3, 0.3))
    t = t * torch.tensor([math.exp(u(-0.1, 0.1)) for _ in range(3)])[:, None, None]
    if torch.rand(1, generator=gen).item() < 0.3:
        t = C.gaussian_blur(t, u(0.5, 1.5))
    return modified * (1 - mask) + t.clamp(0, 255) * mask


def looks(case, layer):
    """Keys at `layer` of COPIES transformed, recoloured copies of each exemplar image (cached)."""
    path = os.path.join(R.CACHE, f"looks_{case}_{layer}.pt")
    if os.path.exists(path):
        return torch.load(path)
    gen = torch.Generator().manual_seed(7)
    originals, modified, masks = [], [], []
    for o, m, k in R.exemplar_images(case):
        for p in R.aug_params(gen, COPIES):
            mask = R.apply_aug(k, p)
            originals.append(R.apply_aug(o, p))
            modified.append(recolour(R.apply_aug(m, p), mask, gen))
            masks.append(mask)
    out = dict(orig=R.image_keys(layer, originals), mod=R.image_keys(layer, modified), mask=torch.stack(masks))
    torch.save(out, path)
    return out


def ground_mask(case, layer):
    """The kept items' concept masks at the layer's grid."""
    root = os.path.join(R.BENCH, case)
    masks = torch.stack([R.load_mask(os.path.join(root, "items", f"{int(i):04d}_mask.png"))
                         for i in R.DATA[case]["keep"]])
    return F.adaptive_avg_pool2d(masks, R.layer_data(layer)[case]["item_mod"][0].shape[-2:]) > 0.5


def run_case(case, layer, gates):
    data = R.DATA[case]
    ld = R.layer_data(layer)
    d = ld[case]
    extra = looks(case, layer)
    ground = ground_mask(case, layer)
    rows = {g: [] for g in gates}
    for i in range(len(data["ex_stamp"])):
        sel = (data["labels"] != int(data["ex_label"][i])).nonzero()[:, 0]
        labels = data["labels"][sel]
        pick = lambda pair: (pair[0][sel], None if pair[1] is None else pair[1][sel])
        before = (d["item_mod_top1"][sel] != labels).sum().item()
        delta = R.solve_multi(layer, case, [i], layers=(layer,), lam=30, mu=10)
        edits = {l: R.weight0(l) + GAIN * dw for l, dw in delta.items()}
        for name in gates:
            kind, _, fraction = name.partition(":")
            copies = slice(i * COPIES, (i + 1) * COPIES)
            more = [(extra["mod"][0][copies], extra["orig"][0][copies], extra["mask"][copies])] if kind == "looks" else []
            w, closed, open_ = G.fit_gate(layer, case, [i], 0.99, 0.5, extra=more)
            if fraction:
                open_ = closed + float(fraction) * (open_ - closed)
            gate = (w, closed, open_)
            run = lambda pair: G.batched(lambda k, s: G.logits((layer,), k, s, edits, gate), *pair).argmax(1)
            after = (run(pick(d["item_mod"])) != labels).sum().item()
            clean = (run(pick(d["item_orig"])) == labels).float().mean().item()
            changed = (run(ld["photos"]) != ld["photos_top1"]).float().mean().item()
            opening = lambda keys: (G.gate_values(gate, keys) * ground).sum().item() / ground.sum().item()
            rows[name].append((100 * max((before - after) / max(before, 1), -1), 100 * clean, 100 * changed,
                               opening(d["item_mod"][0]), opening(d["item_orig"][0])))
        print(f"  {case} image {i}: " + ", ".join(f"{g} {rows[g][-1][0]:.1f}" for g in gates), flush=True)
    for name, values in rows.items():
        t = torch.tensor(values)
        for label, part in [(f"comp. {c}", t[c::3]) for c in range(3)] + [("all 15", t)]:
            m = part.mean(0)
            print(f"{case} {name:<12} {label:<7}: corrected {m[0]:5.1f} ± {part[:, 0].std():4.1f}, clean {m[1]:5.1f}, "
                  f"photos changed {m[2]:4.1f}, gate on the new ground {m[3]:.3f}, on the old {m[4]:.3f}")
        diff = t[:, 0] - torch.tensor(rows[gates[0]])[:, 0]
        print(f"{case} {name:<12} against {gates[0]}: {diff.mean():+.1f} ± {diff.std() / math.sqrt(len(diff)):.1f} "
              f"(better in {(diff > 0).sum()}, worse in {(diff < 0).sum()} of {len(diff)})", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=",".join(R.CASES))
    ap.add_argument("--layer", type=int, default=10)
    ap.add_argument("--gates", default="plain,looks,plain:0.5,plain:0.25,plain:0.1,looks:0.25")
    args = ap.parse_args()
    R.DATA = R.build_cache()
    torch.set_grad_enabled(False)
    for case in args.cases.split(","):
        run_case(case, args.layer, args.gates.split(","))


if __name__ == "__main__":
    main()
