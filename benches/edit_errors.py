"""Where the defaults' one-exemplar edits send the kit's re-textured items: fixed, newly wrong, and to which classes.

    .venv/bin/python benches/edit_errors.py --server http://127.0.0.1:8080 [--case road2snow] [--body '{}']

Against a live server (any build): every kept item of the case (its original classified right by version 0) is
classified re-textured by version 0, then, for each of the kit's 15 exemplar images, by a one-exemplar edit of
version 0 made with `--body` (the defaults unless given). Per edit it prints the errors on items of other classes,
how many it fixes, how many items it turns wrong that version 0 read right, what those are and where they go (the
exemplar's class or others, by name), the items turned wrong most often, and the totals over the 15 edits, also
per texture of the items' new concept (`style`).
"""
import argparse
import collections
import json
import os

import edit_benchmark as B


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--case", default="road2snow")
    ap.add_argument("--body", default="{}", help="the edit request's settings, as JSON")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/editserve-bench-dev"))
    a = ap.parse_args()
    api = B.Api(a.server)
    d = os.path.join(a.cache, "bench", a.case)
    names = json.load(open(os.path.join(B.ROOT, "models", B.MODEL, "config.json")))["labels"]
    items = json.load(open(os.path.join(d, "items.json")))
    originals = [os.path.join(d, "items", f"{it['id']:04d}_orig.png") for it in items]
    kept = [it for it, top1 in zip(items, B.top1s(api, originals)) if top1 == it["label"]]
    modified = [os.path.join(d, "items", f"{it['id']:04d}_mod.png") for it in kept]
    before = B.top1s(api, modified)
    totals, destinations, fragile = collections.Counter(), collections.Counter(), collections.Counter()
    by_style = collections.defaultdict(collections.Counter)  # per texture of the new concept
    for stamp, composition, stem, label in B.kit_exemplars(d, range(5)):
        accepted = api.call("POST", f"/v1/models/{B.MODEL}/versions",
                            dict(json.loads(a.body), exemplars=[B.upload_exemplar(api, stem)], parent=0))
        if api.wait(accepted["job"]["id"])["state"] != "succeeded":
            raise RuntimeError(f"the edit from stamp {stamp}, composition {composition} failed")
        after = B.top1s(api, modified, accepted["version"]["number"])
        scored = [i for i, it in enumerate(kept) if it["label"] != label]
        wrong_before = [i for i in scored if before[i] != kept[i]["label"]]
        fixed = [i for i in wrong_before if after[i] == kept[i]["label"]]
        broken = [i for i in scored if before[i] == kept[i]["label"] and after[i] != kept[i]["label"]]
        to_exemplar = [i for i in broken if after[i] == label]
        destinations.update(names[after[i]] for i in broken)
        fragile.update(i for i in broken)
        turned = [f"{names[kept[i]['label']]} -> {names[after[i]]}" for i in broken]
        print(f"stamp {stamp}, composition {composition} ({names[label]}): {len(wrong_before)} errors, "
              f"{len(fixed)} fixed, {len(broken)} right ones turned wrong ({len(to_exemplar)} to the exemplar's "
              f"class): {', '.join(turned)}", flush=True)
        totals.update(errors=len(wrong_before), fixed=len(fixed), broken=len(broken), to_exemplar=len(to_exemplar))
        for kind, chosen in (("scored", scored), ("errors", wrong_before), ("fixed", fixed), ("broken", broken)):
            for i in chosen:
                by_style[kept[i]["style"]][kind] += 1
    net = 100.0 * (totals["fixed"] - totals["broken"]) / max(totals["errors"], 1)
    print(f"over the 15 edits: {dict(totals)}; net {net:.1f}% of the errors; turned wrong into: "
          f"{', '.join(f'{n} {c}' for n, c in destinations.most_common(10))}")
    print("turned wrong most often: " + ", ".join(
        f"item {kept[i]['id']} ({names[kept[i]['label']]} on {kept[i]['style']}) {c} times"
        for i, c in fragile.most_common(8)))
    for style, counts in sorted(by_style.items()):
        net = 100.0 * (counts["fixed"] - counts["broken"]) / max(counts["errors"], 1)
        print(f"  items on {style}: {dict(counts)}; net {net:.1f}%")


if __name__ == "__main__":
    main()
