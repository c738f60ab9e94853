"""Checks a running TorchServe (serve.sh start) against the project's reference: POSTs each photo's raw
bytes to /predictions/lite0 and compares the top-1 class and its probability with what tools/reference.py
classify (the upstream PyTorch model, PIL/torchvision preprocessing) gives in the project venv.
Standard library only; exits 1 on any mismatch.

Usage: python verify.py [--url http://127.0.0.1:8080/predictions/lite0] [--concurrency 1] [IMAGE...]
  (default images: <repo>/data/foolbox/*.jpg; --reference-python, default <repo>/.venv/bin/python)
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def predict(url, path):
    with open(path, "rb") as f:
        body = f.read()
    # Any content type but a form's: TorchServe decodes application/x-www-form-urlencoded (curl's
    # --data-binary default) as form fields and fails on binary bodies.
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(request, timeout=120) as response:
        top5 = json.load(response)
    label, prob = max(top5.items(), key=lambda kv: kv[1])
    return int(label), prob, top5


def reference(python, package, images):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = subprocess.run([python, os.path.join(ROOT, "tools", "reference.py"), "classify", "--package", package,
                          *images], check=True, capture_output=True, text=True, env=env).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    return {row["path"]: (row["top1"], row["probability"]) for row in rows}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default=f"http://127.0.0.1:{os.environ.get('TS_PORT', '8080')}/predictions/lite0")
    parser.add_argument("--reference-python", default=os.path.join(ROOT, ".venv", "bin", "python"))
    parser.add_argument("--package", default=os.path.join(ROOT, "models", "efficientnet-lite0"))
    parser.add_argument("--concurrency", type=int, default=1,
                        help="requests in flight at once (> 1 exercises server-side batching)")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="largest top-1 probability difference")
    parser.add_argument("images", nargs="*")
    args = parser.parse_args()
    images = args.images or sorted(glob.glob(os.path.join(ROOT, "data", "foolbox", "*.jpg")))
    if not images:
        raise SystemExit("no images")

    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        served = dict(zip(images, pool.map(lambda p: predict(args.url, p), images)))
    expected = reference(args.reference_python, args.package, images)

    failures = 0
    for path in images:
        top1, prob, _ = served[path]
        ref_top1, ref_prob = expected[path]
        ok = top1 == ref_top1 and abs(prob - ref_prob) <= args.tolerance
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {os.path.basename(path)}: torchserve {top1} ({prob:.4f}), "
              f"reference {ref_top1} ({ref_prob:.4f}), |dp| {abs(prob - ref_prob):.1e}")
    print(f"{len(images) - failures} passed, {failures} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
