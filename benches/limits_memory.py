"""Peak memory of the server under the largest requests its limits admit (issue 13: "memory stays bounded under
any request the limits admit"). Each scenario runs on a fresh server (so that the high-water mark is its own),
sends CONCURRENCY copies of its request at once, and reports the process' resident set before, and its peak
(VmHWM) after, with the statuses seen.

    .venv/bin/python benches/limits_memory.py [--concurrency 8,32] [--binary target/release/editserve]

Scenarios (defaults of the limits: 16 MiB bodies, 64 images and 100 M header pixels per classification,
40 M pixels per image):
  * tiny64:   /v1 classify, multipart with 64 one-pixel PNGs (the probe's 5,000-part request is now refused);
  * pixels:   /v1 classify, multipart with 64 solid 1250 x 1250 PNGs (97.7 M pixels decoded, one at a time);
  * too_many: /v1 classify, multipart with 5,000 one-pixel PNGs (refused: 413);
  * fp32:     /v2 infer, 27 preprocessed FP32 tensors 3 x 224 x 224 as binary data (15.5 MiB body);
  * base64:   /v2 infer, 64 noisy 420 x 420 JPEGs as base64 JSON (15 MiB).
"""
import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "efficientnet-lite0"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(width, height, colour=(90, 140, 60)):
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, "PNG")
    return out.getvalue()


def jpeg(width, height):
    rng = np.random.default_rng(0)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(out, "JPEG", quality=80)
    return out.getvalue()


def multipart(images):
    boundary = "editserve-limits-memory"
    body = b"".join(
        b"--" + boundary.encode() + b'\r\nContent-Disposition: form-data; name="image"; filename="i.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + image + b"\r\n" for image in images
    ) + b"--" + boundary.encode() + b"--\r\n"
    return body, f"multipart/form-data; boundary={boundary}", {}


def scenarios():
    tiny = png(1, 1)
    big = png(1250, 1250)
    fp32 = np.zeros((27, 3, 224, 224), dtype="<f4").tobytes()
    header = json.dumps({"inputs": [{"name": "pixels", "shape": [27, 3, 224, 224], "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(fp32)}}]}).encode()
    photo = base64.b64encode(jpeg(420, 420)).decode()
    as_json = json.dumps({"inputs": [{"name": "images", "shape": [64], "datatype": "BYTES", "data": [photo] * 64}]})
    v1, v2 = f"/v1/models/{MODEL}/classify", f"/v2/models/{MODEL}/infer"
    return {
        "tiny64": (v1, *multipart([tiny] * 64)),
        "pixels": (v1, *multipart([big] * 64)),
        "too_many": (v1, *multipart([tiny] * 5000)),
        "fp32": (v2, header + fp32, "application/octet-stream", {"Inference-Header-Content-Length": str(len(header))}),
        "base64": (v2, as_json.encode(), "application/json", {}),
    }


def memory(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    return fields


def run(binary, name, request, concurrency):
    port = free_port()
    data = tempfile.mkdtemp(prefix="editserve-memory-")
    server = subprocess.Popen([binary, "serve", "--models-dir", os.path.join(ROOT, "models"), "--models", MODEL,
                               "--listen", f"127.0.0.1:{port}", "--data-dir", data, "--device", "cpu"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if urllib.request.urlopen(url + "/readyz").status == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        path, body, content_type, headers = request
        urllib.request.urlopen(urllib.request.Request(url + f"/v1/models/{MODEL}/classify", data=png(224, 224),
                                                      headers={"Content-Type": "image/png"}))
        before = memory(server.pid)["VmRSS"]
        statuses = []

        def send():
            req = urllib.request.Request(url + path, data=body, headers={"Content-Type": content_type, **headers})
            try:
                statuses.append(urllib.request.urlopen(req, timeout=600).status)
            except urllib.error.HTTPError as e:
                statuses.append(e.code)
            except urllib.error.URLError:
                statuses.append("reset")

        started = time.time()
        threads = [threading.Thread(target=send) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.time() - started
        peak = memory(server.pid)["VmHWM"]
        codes = ",".join(f"{c}x{statuses.count(c)}" for c in sorted(set(statuses), key=str))
        print(f"{name:<9} x{concurrency:<3} body {len(body) / 2**20:5.1f} MiB | resident before {before:6.0f} MiB, "
              f"peak {peak:6.0f} MiB (+{peak - before:5.0f}) | {codes} in {seconds:.1f} s", flush=True)
    finally:
        server.terminate()
        server.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/editserve"))
    ap.add_argument("--concurrency", default="8,32")
    ap.add_argument("--scenarios", default="tiny64,pixels,too_many,fp32,base64")
    a = ap.parse_args()
    all_scenarios = scenarios()
    for concurrency in [int(c) for c in a.concurrency.split(",")]:
        for name in a.scenarios.split(","):
            run(a.binary, name, all_scenarios[name], concurrency)


if __name__ == "__main__":
    sys.exit(main())
