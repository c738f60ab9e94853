"""Would deferring to the unedited model where it is confident keep what an edit fixes and drop what it breaks?

    .venv/bin/python benches/edit_defer.py --server http://127.0.0.1:8080 [--case road2snow] [--body '{}']
        [--taus 0.9,0.7,0.5,0.4,0.3,0.2] [--exemplars 1|3]

Against a live server (any build): the kept items of the case (originals version 0 classifies right), their
re-textured copies and the benchmark's photos are classified by version 0 with its top-1 probability, then by a
one-exemplar edit of version 0 (made with `--body`, the defaults unless given) from each of the kit's 15 exemplar
images (`--exemplars 3`: one edit per stamp from its three images, composition 0 standing for the stamp). For each threshold tau it scores, offline, the rule "the edit's answer where version 0's top-1
probability is below tau, version 0's elsewhere", under the kit's metrics (% errors corrected on items of classes
other than the exemplar's, clean originals kept, photos changed): the mean over composition 0's five trials (the
protocol's) and over all 15, with the items fixed and turned wrong summed over the 15. It also prints version 0's
top-1 probability quartiles on the re-textured items the edits fix and on those they turn wrong.
"""
import argparse
import json
import os
import statistics

import edit_benchmark as B


def classify(api, paths, version=0):
    """(top-1 index, its probability) of each image under `version`."""
    out = []
    for i in range(0, len(paths), 32):
        chunk = paths[i:i + 32]
        reply = api.multipart(f"/v1/models/{B.MODEL}/classify?top_k=1&version={version}",
                              [("image", (os.path.basename(p), B.read(p))) for p in chunk])
        out += [(r["predictions"][0]["index"], r["predictions"][0]["probability"]) for r in reply["results"]]
    return out


def deferred(base, edited, tau):
    return [b[0] if b[1] >= tau else e[0] for b, e in zip(base, edited)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--case", default="road2snow")
    ap.add_argument("--body", default="{}", help="the edit request's settings, as JSON")
    ap.add_argument("--taus", default="0.9,0.7,0.6,0.5,0.4,0.3,0.2")
    ap.add_argument("--exemplars", type=int, choices=(1, 3), default=1)
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/editserve-bench-dev"))
    a = ap.parse_args()
    api = B.Api(a.server)
    d = os.path.join(a.cache, "bench", a.case)
    items = json.load(open(os.path.join(d, "items.json")))
    paths = lambda chosen, kind: [os.path.join(d, "items", f"{it['id']:04d}_{kind}.png") for it in chosen]
    kept = [it for it, (top1, _) in zip(items, classify(api, paths(items, "orig"))) if top1 == it["label"]]
    labels = [it["label"] for it in kept]
    images = {"mod": paths(kept, "mod"), "orig": paths(kept, "orig"), "photo": B.benchmark_photos(os.path.join(a.cache, "bench"))}
    base = {kind: classify(api, p) for kind, p in images.items()}
    trials = []
    groups = {}
    for stamp, composition, stem, label in B.kit_exemplars(d, range(5)):
        groups.setdefault((stamp, composition if a.exemplars == 1 else 0, label), []).append(stem)
    for (stamp, composition, label), stems in groups.items():
        exemplars = [B.upload_exemplar(api, stem) for stem in stems]
        accepted = api.call("POST", f"/v1/models/{B.MODEL}/versions",
                            dict(json.loads(a.body), exemplars=exemplars, parent=0))
        if api.wait(accepted["job"]["id"])["state"] != "succeeded":
            raise RuntimeError(f"the edit from stamp {stamp}, composition {composition} failed")
        number = accepted["version"]["number"]
        trials.append((composition, label, {kind: classify(api, p, number) for kind, p in images.items()}))
        print(f"edit from stamp {stamp}, composition {composition} done", flush=True)

    fixed_p, broken_p = [], []
    for _, label, edited in trials:
        for i, truth in enumerate(labels):
            if truth != label and (base["mod"][i][0] == truth) != (edited["mod"][i][0] == truth):
                (broken_p if base["mod"][i][0] == truth else fixed_p).append(base["mod"][i][1])
    quartiles = lambda v: ", ".join(f"{q:.2f}" for q in statistics.quantiles(v, n=4)) if len(v) > 1 else "-"
    print(f"version 0's top-1 probability on the re-textured items the edits fix: quartiles {quartiles(fixed_p)} "
          f"({len(fixed_p)}); on those they turn wrong: {quartiles(broken_p)} ({len(broken_p)})")

    for tau in [float("inf")] + [float(t) for t in a.taus.split(",")]:
        scores, fixed, broken = [], 0, 0
        for composition, label, edited in trials:
            after = {kind: deferred(base[kind], edited[kind], tau) for kind in images}
            scored = [i for i, truth in enumerate(labels) if truth != label]
            errors = [i for i in scored if base["mod"][i][0] != labels[i]]
            f = sum(after["mod"][i] == labels[i] for i in errors)
            b = sum(base["mod"][i][0] == labels[i] and after["mod"][i] != labels[i] for i in scored)
            clean = 100.0 * sum(after["orig"][i] == labels[i] for i in scored) / len(scored)
            changed = 100.0 * sum(x != y[0] for x, y in zip(after["photo"], base["photo"])) / len(base["photo"])
            scores.append((composition, 100.0 * (f - b) / max(len(errors), 1), clean, changed))
            fixed, broken = fixed + f, broken + b
        mean = lambda rows: " / ".join(f"{statistics.mean(r[k] for r in rows):.1f}" for k in (1, 2, 3))
        name = "the edit alone" if tau == float("inf") else f"tau {tau:.2f}"
        print(f"{name:15s} composition 0: {mean([s for s in scores if s[0] == 0])} | all 15: {mean(scores)} "
              f"(corrected / clean / photos changed, %) | fixed {fixed}, turned wrong {broken}")


if __name__ == "__main__":
    main()
