"""Which real photos an edit changes, and how close to a tie each was: the photo half of the breakage
constraint of `edit_benchmark.py`, photo by photo.

    .venv/bin/python benches/edit_photo_flips.py [--cases grass2sand,road2snow] [--exemplars 1,3]
        [--layers _blocks.10._project_conv,_blocks.11._project_conv,_blocks.12._project_conv] [--port 8093]

Starts target/release/editserve on a fresh data directory (as edit_benchmark.py does), makes one
`gated_least_squares` edit over `--layers` per exemplar stamp of the kit (1 exemplar: composition 0; 3: all
three) and classifies the benchmark's 25 photos (the kit's 5 and the 20 foolbox photos) with version 0 and with
the edit. Prints, per edit, the guard's scale and its own check photos changed, and each benchmark photo whose
top-1 changed with its top-1 minus top-2 probability under version 0; then the photos closest to a tie.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import edit_benchmark as B  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="grass2sand,road2snow")
    ap.add_argument("--exemplars", default="1,3")
    ap.add_argument("--layers",
                    default="_blocks.10._project_conv,_blocks.11._project_conv,_blocks.12._project_conv")
    ap.add_argument("--port", type=int, default=8093)
    a = ap.parse_args()
    bench = B.ensure_kit(os.path.join(B.ROOT, "..", "shared", "bench-dev"),
                         os.path.expanduser("~/.cache/editserve-bench-dev"))
    api, process = B.start_server(a.port)
    try:
        photos = B.benchmark_photos(bench)

        def classify(version):
            """(top-1 index, top-1 minus top-2 probability) of each photo."""
            out = []
            for i in range(0, len(photos), 32):
                reply = api.multipart(f"/v1/models/{B.MODEL}/classify?top_k=2&version={version}",
                                      [("image", (os.path.basename(p), B.read(p))) for p in photos[i:i + 32]])
                out += [(r["predictions"][0]["index"],
                         r["predictions"][0]["probability"] - r["predictions"][1]["probability"])
                        for r in reply["results"]]
            return out

        base = classify(0)
        for case in a.cases.split(","):
            d = os.path.join(bench, case)
            exemplars = {(stamp, g): B.upload_exemplar(api, stem) for stamp, g, stem, _ in B.kit_exemplars(d, range(5))}
            for count in (int(c) for c in a.exemplars.split(",")):
                for stamp in range(5):
                    body = {"solver": "gated_least_squares", "layers": a.layers.split(","),
                            "exemplars": [exemplars[(stamp, g)] for g in range(count)]}
                    accepted = api.call("POST", f"/v1/models/{B.MODEL}/versions", body)
                    if api.wait(accepted["job"]["id"])["state"] != "succeeded":
                        raise RuntimeError(f"the edit of stamp {stamp} failed")
                    number = accepted["version"]["number"]
                    guard = api.call("GET", f"/v1/models/{B.MODEL}/versions/{number}")["metrics"]["guard"]
                    changed = [f"{os.path.basename(photos[i])} (margin {b[1]:.3f}: {b[0]} -> {e[0]})"
                               for i, (b, e) in enumerate(zip(base, classify(number))) if b[0] != e[0]]
                    print(f"{case} {count} ex, stamp {stamp}: scale {guard['scale']}, check photos changed "
                          f"{guard['photos_changed']} of {guard['photos']}; benchmark photos changed: "
                          f"{', '.join(changed) or 'none'}", flush=True)
                    api.call("DELETE", f"/v1/models/{B.MODEL}/versions/{number}")
        closest = sorted((b[1], os.path.basename(p)) for p, b in zip(photos, base))[:6]
        print("closest to a tie under version 0:", ", ".join(f"{name} {margin:.3f}" for margin, name in closest))
    finally:
        process.terminate()
        process.wait(timeout=60)


if __name__ == "__main__":
    main()
