"""Edit quality on the development concept-shift benchmark, through the REST API only.

    .venv/bin/python benches/edit_benchmark.py [--configs defaults,adam,...] [--cases road2snow,grass2sand]
        [--exemplars 1,3] [--server http://127.0.0.1:8080 | (default) start target/release/editserve]
        [--composition 0|1|2|all] [--kit ../shared/bench-dev] [--cache ~/.cache/editserve-bench-dev] [--json out.json] [--own-check]
        [--item-exemplars varied|one-texture] [--chain]

A config is a named request (`CONFIGS`); NAME_seedN is NAME's with `"seed": N`.

Builds the kit's data when missing (its fetch.sh and build.py), then, against a live server (started here on
a fresh data directory unless --server is given), follows the kit's protocol (its README) with
efficientnet-lite0:
  * the originals the base model classifies correctly are kept (classified over HTTP by version 0);
  * one pairs dataset per case (kept originals and their re-textured copies, with labels) and one unlabelled
    dataset of real photos (the kit's photos/ and the 20 foolbox ImageNet photos) are uploaded;
  * per setting, per exemplar count (1: composition 0, or --composition; 3: all three) and per exemplar stamp (5), an edit of
    version 0 from that stamp's exemplars (uploaded as exemplars: image, mask, modified); `--composition all`
    makes one-exemplar trials from each of the three compositions, so a row covers all 15 exemplar images;
  * evaluation jobs score every version against version 0: % errors corrected on the re-textured items of
    classes other than the stamp's, accuracy on their originals (100% before), photos whose top-1 changed.
With --chain, several exemplars are one edit per exemplar in the order of their compositions, each of the
version the one before made (what a client can do with `parent`); the last version is scored and its guard
reported, and the chain's versions are deleted after scoring.
With --own-check, the guard's check photos are an operator's own photos of the old concept instead of the
server's natural photos: the kept originals of every other object stamp (sorted by name) become an unlabelled
dataset passed as `guard.dataset`, and only the items of the remaining objects are scored.
With --item-exemplars varied|one-texture, the exemplars are kept items of every other object stamp whose new
concept is in every other texture of the kit (`style`), and only items of the remaining objects in the remaining
textures are scored: per trial, 1 or 3 exemplars whose new concept is in the pool's textures in turn (varied) or
all in one texture. It measures what the kit's exemplars cannot show (they all share one texture): the worth of
exemplars that differ in how the new concept looks, judged on textures none of them shows. --stamps names the
trials then.
Prints one row per setting, case and exemplar count: mean +- sd over its trials (the 5 stamps, or 15). Nothing here is tuned on
or specific to the kit's items: it only drives the service.
"""
import argparse
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "efficientnet-lite0"

# The settings compared: the request body an edit is made with (exemplars added per trial).
CONFIGS = {
    "defaults": {},
    "adam_unguarded": {"method": "rewrite", "solver": "adam", "guard": {"max_changed": 1.0}},
    "adam": {"method": "rewrite", "solver": "adam"},
    "closed_form": {"method": "rewrite", "solver": "closed_form"},
    "least_squares": {"method": "rewrite", "solver": "least_squares"},
    "least_squares_unguarded": {"method": "rewrite", "solver": "least_squares", "guard": {"max_changed": 1.0}},
    "least_squares_guard5": {"solver": "least_squares", "guard": {"max_changed": 0.05}},
    "least_squares_guard10": {"solver": "least_squares", "guard": {"max_changed": 0.1}},
    "least_squares_b10_11": {"solver": "least_squares",
                             "layers": ["_blocks.10._project_conv", "_blocks.11._project_conv"]},
    "least_squares_b10_11_unguarded": {"solver": "least_squares", "guard": {"max_changed": 1.0},
                                       "layers": ["_blocks.10._project_conv", "_blocks.11._project_conv"]},
    "least_squares_b10_11_guard5": {"solver": "least_squares", "guard": {"max_changed": 0.05},
                                    "layers": ["_blocks.10._project_conv", "_blocks.11._project_conv"]},
    "least_squares_b10_11_guard10": {"solver": "least_squares", "guard": {"max_changed": 0.1},
                                     "layers": ["_blocks.10._project_conv", "_blocks.11._project_conv"]},
    "least_squares_b9_10_11": {"solver": "least_squares",
                               "layers": ["_blocks.9._project_conv", "_blocks.10._project_conv",
                                          "_blocks.11._project_conv"]},
    "least_squares_b10_11_head": {"solver": "least_squares",
                                  "layers": ["_blocks.10._project_conv", "_blocks.11._project_conv", "_conv_head"]},
    "gated": {"solver": "gated_least_squares"},
    "gated_unguarded": {"solver": "gated_least_squares", "guard": {"max_changed": 1.0}},
    "gated_b10": {"solver": "gated_least_squares", "layer": "_blocks.10._project_conv"},
    "gated_b10_11": {"solver": "gated_least_squares",
                     "layers": ["_blocks.10._project_conv", "_blocks.11._project_conv"]},
    "gated_b10_11_head": {"solver": "gated_least_squares",
                          "layers": ["_blocks.10._project_conv", "_blocks.11._project_conv", "_conv_head"]},
    "gated_b10_11_guard1": {"solver": "gated_least_squares", "guard": {"max_changed": 0.01},
                            "layers": ["_blocks.10._project_conv", "_blocks.11._project_conv"]},
    "gated_b10_11_12": {"solver": "gated_least_squares",
                        "layers": ["_blocks.10._project_conv", "_blocks.11._project_conv", "_blocks.12._project_conv"]},
    "gated_b9_10_11": {"solver": "gated_least_squares",
                       "layers": ["_blocks.9._project_conv", "_blocks.10._project_conv", "_blocks.11._project_conv"]},
    "gated_b9_10": {"solver": "gated_least_squares",
                    "layers": ["_blocks.9._project_conv", "_blocks.10._project_conv"]},
    "gated_b1": {"solver": "gated_least_squares", "layer": "_blocks.1._project_conv"},
    "gated_b2": {"solver": "gated_least_squares", "layer": "_blocks.2._project_conv"},
    "gated_b4": {"solver": "gated_least_squares", "layer": "_blocks.4._project_conv"},
    "gated_b3_5": {"solver": "gated_least_squares", "layers": ["_blocks.3._project_conv", "_blocks.5._project_conv"]},
    "gated_b3": {"solver": "gated_least_squares", "layer": "_blocks.3._project_conv"},
    "gated_b5": {"solver": "gated_least_squares", "layer": "_blocks.5._project_conv"},
    "gated_b3_10_11": {"solver": "gated_least_squares",
                       "layers": ["_blocks.3._project_conv", "_blocks.10._project_conv", "_blocks.11._project_conv"]},
    "gated_b5_10_11": {"solver": "gated_least_squares",
                       "layers": ["_blocks.5._project_conv", "_blocks.10._project_conv", "_blocks.11._project_conv"]},
    "gated_b6_10_11": {"solver": "gated_least_squares",
                       "layers": ["_blocks.6._project_conv", "_blocks.10._project_conv", "_blocks.11._project_conv"]},
    "gated_b8_10_11": {"solver": "gated_least_squares",
                       "layers": ["_blocks.8._project_conv", "_blocks.10._project_conv", "_blocks.11._project_conv"]},
    "gated_b7": {"solver": "gated_least_squares", "layer": "_blocks.7._project_conv"},
    "gated_b7_10_11": {"solver": "gated_least_squares",
                       "layers": ["_blocks.7._project_conv", "_blocks.10._project_conv", "_blocks.11._project_conv"]},
    "defaults_rank1": {"rank": 1},
    "defaults_rank2": {"rank": 2},
    "defaults_rank4": {"rank": 4},
    "defaults_rank16": {"rank": 16},
    "least_squares_b10": {"solver": "least_squares", "layer": "_blocks.10._project_conv"},
    "least_squares_b10_unguarded": {"solver": "least_squares", "layer": "_blocks.10._project_conv",
                                    "guard": {"max_changed": 1.0}},
    "least_squares_b12": {"solver": "least_squares", "layer": "_blocks.12._project_conv"},
    "least_squares_b15": {"solver": "least_squares", "layer": "_blocks.15._project_conv"},
    "least_squares_head": {"solver": "least_squares", "layer": "_conv_head"},
    "adam_b15": {"solver": "adam", "layer": "_blocks.15._project_conv"},
    "adam_b15_unguarded": {"solver": "adam", "layer": "_blocks.15._project_conv", "guard": {"max_changed": 1.0}},
    "finetune_local": {"method": "finetune_local"},
    "finetune_global": {"method": "finetune_global"},
}


def config(name):
    """The request settings of a named config; NAME_seedN is NAME's with `"seed": N` (other transformed copies)."""
    base, _, seed = name.rpartition("_seed")
    if name not in CONFIGS and base in CONFIGS and seed.isdigit():
        return dict(CONFIGS[base], seed=int(seed))
    return CONFIGS[name]


class Api:
    def __init__(self, base):
        self.base = base.rstrip("/")

    def call(self, method, path, body=None, content_type=None, expect=(200, 201, 202, 204)):
        headers = {}
        if isinstance(body, (dict, list)):
            body, content_type = json.dumps(body).encode(), "application/json"
        if content_type:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(self.base + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                status, text = response.status, response.read()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read()
        if status not in expect:
            raise RuntimeError(f"{method} {path}: {status} {text[:500]!r}")
        return json.loads(text) if text else None

    def multipart(self, path, fields):
        """fields: list of (name, value) where value is str (a text part) or (filename, bytes)."""
        boundary = uuid.uuid4().hex
        out = io.BytesIO()
        for name, value in fields:
            out.write(f"--{boundary}\r\n".encode())
            if isinstance(value, str):
                out.write(f'Content-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
            else:
                filename, data = value
                kind = "image/png" if filename.endswith(".png") else "image/jpeg"
                out.write(f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                          f"Content-Type: {kind}\r\n\r\n".encode())
                out.write(data)
                out.write(b"\r\n")
        out.write(f"--{boundary}--\r\n".encode())
        return self.call("POST", path, out.getvalue(), f"multipart/form-data; boundary={boundary}")

    def wait(self, job_id, deadline_s=1800):
        started = time.time()
        while time.time() - started < deadline_s:
            job = self.call("GET", f"/v1/jobs/{job_id}")
            if job["state"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(0.1)
        raise RuntimeError(f"job {job_id} did not finish in {deadline_s} s")


def read(path):
    with open(path, "rb") as f:
        return f.read()


def ensure_kit(kit, cache):
    bench = os.path.join(cache, "bench")
    if not os.path.exists(os.path.join(bench, "grass2sand", "items.json")):
        subprocess.run(["bash", os.path.join(kit, "fetch.sh"), cache], check=True)
        subprocess.run([sys.executable, os.path.join(kit, "build.py"), "--cache", cache], check=True)
    return bench


def start_server(port):
    data = tempfile.mkdtemp(prefix="editserve-bench-")
    binary = os.path.join(ROOT, "target", "release", "editserve")
    log = open(os.path.join(data, "server.log"), "w")
    process = subprocess.Popen([binary, "serve", "--models-dir", os.path.join(ROOT, "models"), "--models", MODEL,
                                "--listen", f"127.0.0.1:{port}", "--data-dir", data, "--device", "cpu",
                                "--edit-queue-capacity", "64", "--edit-threads", "2"],
                               cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    api = Api(f"http://127.0.0.1:{port}")
    for _ in range(600):
        try:
            if api.call("GET", "/readyz", expect=(200, 503)).get("status") == "ready":
                return api, process, data
        except (urllib.error.URLError, ConnectionError):
            pass
        if process.poll() is not None:
            raise RuntimeError(f"the server exited; see {log.name}")
        time.sleep(0.5)
    raise RuntimeError("the server did not become ready")


def top1s(api, paths, version=0):
    """A version's top-1 of each image, classified over HTTP in multipart batches."""
    out = []
    for i in range(0, len(paths), 32):
        chunk = paths[i:i + 32]
        reply = api.multipart(f"/v1/models/{MODEL}/classify?top_k=1&version={version}",
                              [("image", (os.path.basename(p), read(p))) for p in chunk])
        out += [r["predictions"][0]["index"] for r in reply["results"]]
    return out


def benchmark_photos(bench):
    """The real photos whose top-1 changes the constraint counts: the kit's photos/ and the 20 foolbox photos."""
    photos = sorted(os.path.join(bench, "photos", f) for f in os.listdir(os.path.join(bench, "photos")))
    foolbox = os.path.join(ROOT, "data", "foolbox")
    return photos + sorted(os.path.join(foolbox, f) for f in os.listdir(foolbox) if f.startswith("imagenet_"))


def upload_exemplar(api, stem):
    """The exemplar `stem`_{orig,mask,mod}.png, uploaded; its id."""
    return api.multipart("/v1/exemplars", [("image", ("orig.png", read(stem + "_orig.png"))),
                                           ("mask", ("mask.png", read(stem + "_mask.png"))),
                                           ("modified", ("mod.png", read(stem + "_mod.png")))])["id"]


def kit_exemplars(d, stamps):
    """(trial, composition, file stem, label) of the kit's exemplars: trial = exemplar stamp."""
    for ex in json.load(open(os.path.join(d, "exemplars.json"))):
        if ex["index"] in stamps:
            yield ex["index"], ex["composition"], os.path.join(d, "exemplars", f"{ex['index']:02d}_{ex['composition']}"), ex["label"]


def item_exemplars(d, pool, trials, count, kind):
    """Per trial, `count` kept items of the pool as exemplars: new-concept textures (`style`) taken in turn
    (varied) or all the same (one-texture); the same draw for every run."""
    rng = random.Random(20261130)
    styles = sorted({it["style"] for it in pool})
    for trial in trials:
        first = rng.randrange(len(styles))
        turn = [styles[(first + g) % len(styles)] for g in range(count)] if kind == "varied" else [styles[first]] * count
        chosen = []
        for style in turn:
            chosen.append(rng.choice([it for it in pool if it["style"] == style and it not in chosen]))
        for g, it in enumerate(chosen):
            yield trial, g, os.path.join(d, "items", f"{it['id']:04d}"), it["label"]


def mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {sd:.1f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="defaults,least_squares_unguarded,adam_b15,adam_b15_unguarded,finetune_local")
    ap.add_argument("--cases", default="grass2sand,road2snow")
    ap.add_argument("--exemplars", default="1,3")
    ap.add_argument("--stamps", default="0,1,2,3,4")
    ap.add_argument("--composition", default="0", choices=["0", "1", "2", "all"],
                    help="the kit's composition a one-exemplar trial edits from (the protocol's: 0); all: a trial "
                         "from each, 15 in all")
    ap.add_argument("--server")
    ap.add_argument("--port", type=int, default=18181)
    ap.add_argument("--kit", default=os.path.join(ROOT, "..", "shared", "bench-dev"))
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/editserve-bench-dev"))
    ap.add_argument("--json")
    ap.add_argument("--chain", action="store_true",
                    help="several exemplars as one edit per exemplar, each of the version the one before made")
    ap.add_argument("--own-check", action="store_true",
                    help="guard with the kept originals of half the objects; score the other half")
    ap.add_argument("--item-exemplars", choices=["varied", "one-texture"],
                    help="exemplars are kept items of half the objects (the other half is scored): each trial's "
                         "exemplars show the new concept in different textures (varied) or all in one")
    ap.add_argument("--repeat", type=int, default=1,
                    help="each exemplar sent this many times in one edit (solved in turn on the model as kept)")
    ap.add_argument("--reverse", action="store_true",
                    help="several exemplars in the reverse of the kit's composition order (the last solved first)")
    a = ap.parse_args()
    configs = {name: config(name) for name in a.configs.split(",")}
    counts = [int(n) for n in a.exemplars.split(",")]
    stamps = [int(s) for s in a.stamps.split(",")]
    one = [0, 1, 2] if a.composition == "all" else [int(a.composition)]  # a one-exemplar trial's compositions
    bench = ensure_kit(a.kit, a.cache)
    process, data = None, None
    if a.server:
        api = Api(a.server)
    else:
        api, process, data = start_server(a.port)
    finished = False
    try:
        photos = benchmark_photos(bench)
        photo_set = api.multipart("/v1/datasets", [("kind", "unlabelled"), ("name", "bench photos")]
                                  + [("image", (os.path.basename(p), read(p))) for p in photos])["id"]
        rows = []
        for case in a.cases.split(","):
            d = os.path.join(bench, case)
            items = json.load(open(os.path.join(d, "items.json")))
            originals = [os.path.join(d, "items", f"{it['id']:04d}_orig.png") for it in items]
            kept = [it for it, top1 in zip(items, top1s(api, originals)) if top1 == it["label"]]
            own_check = None
            item_pool = []
            if a.item_exemplars:
                pool_objects = set(sorted({it["stamp"] for it in kept})[1::2])
                pool_styles = set(sorted({it["style"] for it in kept})[1::2])
                item_pool = [it for it in kept if it["stamp"] in pool_objects and it["style"] in pool_styles]
                kept = [it for it in kept if it["stamp"] not in pool_objects and it["style"] not in pool_styles]
            if a.own_check:
                checked_objects = sorted({it["stamp"] for it in kept})[::2]
                check = [it for it in kept if it["stamp"] in checked_objects]
                kept = [it for it in kept if it["stamp"] not in checked_objects]
                own_check = api.multipart("/v1/datasets", [("kind", "unlabelled"), ("name", f"{case} own check")] + [
                    ("image", (f"{it['id']}.png", read(os.path.join(d, "items", f"{it['id']:04d}_orig.png"))))
                    for it in check])["id"]
                print(f"[{case}] guard check set: {len(check)} originals of {len(checked_objects)} objects", flush=True)
            fields = [("kind", "pairs"), ("name", f"{case} kept items"), ("labels", json.dumps([it["label"] for it in kept]))]
            for it in kept:
                stem = os.path.join(d, "items", f"{it['id']:04d}")
                fields += [("original", (f"{it['id']}_orig.png", read(stem + "_orig.png"))),
                           ("transformed", (f"{it['id']}_mod.png", read(stem + "_mod.png")))]
            pairs = api.multipart("/v1/datasets", fields)["id"]
            exemplar_ids = {}
            for stamp, g, stem, label in (item_exemplars(d, item_pool, stamps, max(counts + [g + 1 for g in one]), a.item_exemplars)
                                          if a.item_exemplars else kit_exemplars(d, stamps)):
                exemplar_ids[(stamp, g)] = (upload_exemplar(api, stem), label)
            print(f"[{case}] {len(kept)} of {len(items)} items kept; {len(exemplar_ids)} exemplars", flush=True)
            for count in counts:
                trials = {name: [] for name in configs}
                groups = [list(range(count))] if count > 1 else [[g] for g in one]
                for stamp, compositions in ((stamp, g) for stamp in stamps for g in groups):
                    ids = [exemplar_ids[(stamp, g)][0] for g in compositions for _ in range(a.repeat)]
                    ids = ids[::-1] if a.reverse else ids
                    label = exemplar_ids[(stamp, 0)][1]  # items of the exemplars' objects are not scored anyway
                    made, chained = {}, {}
                    for name, body in configs.items():
                        if own_check:
                            body = dict(body, guard=dict(body.get("guard", {}), dataset=own_check))
                        started = time.time()
                        # --chain: one edit per exemplar, each of the version the one before made.
                        steps = [[i] for i in ids] if a.chain else [ids]
                        number, chain = 0, []
                        for step in steps:
                            accepted = api.call("POST", f"/v1/models/{MODEL}/versions",
                                                dict(body, exemplars=step, parent=number))
                            job = api.wait(accepted["job"]["id"])
                            if job["state"] != "succeeded":
                                raise RuntimeError(f"{name} edit failed: {job.get('error')}")
                            number = accepted["version"]["number"]
                            chain.append(number)
                        made[name] = (number, time.time() - started)
                        chained[name] = chain[:-1]
                    # One evaluation per dataset scores all of this stamp's versions against version 0.
                    numbers = [number for number, _ in made.values()]
                    scores = {}
                    for dataset, exclude in ((pairs, [label]), (photo_set, [])):
                        for i in range(0, len(numbers), 8):
                            ev = api.call("POST", f"/v1/models/{MODEL}/evaluations",
                                          {"dataset": dataset, "versions": numbers[i:i + 8], "baseline": 0,
                                           "exclude_classes": exclude})
                            evaluated = api.wait(ev["job"]["id"])
                            if evaluated["state"] != "succeeded":
                                raise RuntimeError(f"evaluation failed: {evaluated.get('error')}")
                            for r in api.call("GET", f"/v1/evaluations/{ev['evaluation']}")["results"]:
                                scores[(dataset, r["version"])] = r
                    for name, (number, seconds) in made.items():
                        version = api.call("GET", f"/v1/models/{MODEL}/versions/{number}")
                        metrics = version.get("metrics") or {}
                        guard = metrics.get("guard") or {}
                        trials[name].append({
                            "stamp": stamp,
                            "compositions": compositions,
                            "corrected": scores[(pairs, number)]["errors_corrected"],
                            "clean": 100.0 * scores[(pairs, number)]["accuracy"],
                            "photos_changed": 100.0 * scores[(photo_set, number)]["changed"],
                            "scale": guard.get("scale"),
                            "exemplar_fixed": guard.get("exemplar_fixed"),
                            "guard": guard,
                            "seconds": seconds,
                            "job_seconds": metrics.get("seconds"),
                        })
                        for done in [number] + chained[name][::-1]:
                            api.call("DELETE", f"/v1/models/{MODEL}/versions/{done}")
                for name, rows_of in trials.items():
                    rows.append({"config": name, "case": case, "exemplars": count, "trials": rows_of})
                    scales = [t["scale"] for t in rows_of if t["scale"] is not None]
                    print(f"{name:24s} {case:10s} {count} ex | corrected {mean_sd([t['corrected'] for t in rows_of]):>12s} %"
                          f" | clean kept {mean_sd([t['clean'] for t in rows_of]):>12s} %"
                          f" | photos changed {mean_sd([t['photos_changed'] for t in rows_of]):>10s} %"
                          f" | scale {mean_sd(scales) if scales else '-':>12s}"
                          f" | fixed {sum(bool(t['exemplar_fixed']) for t in rows_of)}/{len(rows_of)}"
                          f" | edit {mean_sd([t['seconds'] for t in rows_of])} s", flush=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(rows, f, indent=1)
        finished = True
    finally:
        if process:
            process.terminate()
            process.wait(timeout=60)
        # The server's data directory (its versions and log) is kept only when the run failed, to read why.
        if data and finished:
            shutil.rmtree(data, ignore_errors=True)
        elif data:
            print(f"the server's data directory and log are kept in {data}", file=sys.stderr)


if __name__ == "__main__":
    main()
