#!/usr/bin/env python3
"""Side by side: editserve and TorchServe 0.12 serving EfficientNet-Lite0 on this machine, under the same
closed-loop load (wrk, one thread, N connections, the 20 ImageNet JPEGs of data/foolbox in turn), with
each server's CPU use (its whole process tree) and the raw in-process batched forward pass of the same
model measured in the same run. Run: `make bench-serve` (or `python3 benches/serve_compare.py`).

Needs: `wrk` (Debian package), TorchServe's venv (benches/torchserve/setup.sh, run on first use), the
project's release binary and cargo bench build (`make build`)."""

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "efficientnet-lite0"
TICKS = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url, seconds=180):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.5)
    raise SystemExit(f"not ready after {seconds} s: {url}")


def tree_cpu_seconds(root_pid):
    """User + system CPU seconds of a process and all its descendants (threads included)."""
    parent, cpu = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(entry)] = int(fields[1])
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / TICKS
    total, stack = 0.0, [root_pid]
    while stack:
        pid = stack.pop()
        total += cpu.get(pid, 0.0)
        stack.extend(child for child, p in parent.items() if p == pid)
    return total


def load(url, concurrency, seconds, root_pid):
    """Runs wrk against `url`; returns requests/s, p50 and p99 latency (ms), failures and cores used."""
    env = dict(os.environ, IMAGES_DIR=os.path.join(ROOT, "data/foolbox"))
    cpu_before, started = tree_cpu_seconds(root_pid), time.time()
    out = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "30s", "-s",
         os.path.join(ROOT, "benches/wrk/post_images.lua"), url],
        env=env, capture_output=True, text=True, check=True).stdout
    cores = (tree_cpu_seconds(root_pid) - cpu_before) / (time.time() - started)
    fields = dict(kv.split("=") for kv in re.search(r"RESULT (.*)", out).group(1).split())
    rate = float(fields["requests"]) / float(fields["seconds"])
    failures = int(fields["non200"]) + int(fields["errors"])
    return {"rps": rate, "p50": float(fields["p50_ms"]), "p99": float(fields["p99_ms"]), "failures": failures, "cores": cores}


def raw_forward(batch):
    """Images/s of the bare forward pass in one process (libtorch's default threads), from cargo bench."""
    out = subprocess.run(["cargo", "bench", "-q", "--bench", "http_throughput"], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, EDITSERVE_BENCH_RAW_ONLY=str(batch)), check=True).stdout
    return float(out.strip().splitlines()[-1])


class Editserve:
    name = "editserve"

    def __init__(self, args, extra):
        self.port, self.data = free_port(), tempfile.mkdtemp(prefix="editserve-bench-")
        cmd = [os.path.join(ROOT, "target/release/editserve"), "serve", "--listen", f"127.0.0.1:{self.port}",
               "--device", args.device, "--models-dir", os.path.join(ROOT, "models"), "--models", MODEL,
               "--data-dir", self.data] + extra
        self.proc = subprocess.Popen(cmd, env=dict(os.environ, EDITSERVE_LOG="warn"), cwd=ROOT,
                                     stdout=subprocess.DEVNULL)
        wait_ready(f"http://127.0.0.1:{self.port}/readyz")
        self.url = f"http://127.0.0.1:{self.port}/v1/models/{MODEL}/classify"
        self.pid = self.proc.pid

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        if self.proc.wait(timeout=60) != 0:
            print(f"editserve exited with status {self.proc.returncode}", flush=True)
        shutil.rmtree(self.data, ignore_errors=True)


class TorchServe:
    name = "torchserve"
    DIR = os.path.join(ROOT, "benches/torchserve")

    def __init__(self, args, extra):
        if not os.path.exists(os.path.join(self.DIR, ".venv/bin/torchserve")):
            subprocess.run(["bash", os.path.join(self.DIR, "setup.sh")], check=True)
        self.port = free_port()
        env = dict(os.environ, TS_PORT=str(self.port), TS_MANAGEMENT_PORT=str(free_port()), TS_METRICS_PORT=str(free_port()))
        self.env = env
        subprocess.run(["bash", os.path.join(self.DIR, "serve.sh"), "start"] + extra, env=env, check=True)
        self.url = f"http://127.0.0.1:{self.port}/predictions/lite0"
        self.pid = int(subprocess.run(["pgrep", "-f", "-o", "org.pytorch.serve.ModelServer"], capture_output=True,
                                      text=True, check=True).stdout.split()[0])

    def stop(self):
        subprocess.run(["bash", os.path.join(self.DIR, "serve.sh"), "stop"], env=self.env, check=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--seconds", type=int, default=15)
    ap.add_argument("--runs", type=int, default=2, help="measurements per setting; the table shows their mean")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--servers", default="editserve;torchserve:--workers 2 --quiet-logs;"
                            "torchserve:--workers 2 --batch-size 8 --max-batch-delay 5 --quiet-logs",
                    help="';'-separated NAME[:extra arguments] (editserve flags, or benches/torchserve/serve.sh options)")
    ap.add_argument("--raw-batches", default="16,32")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is missing: apt-get install wrk")
    levels = [int(c) for c in args.concurrency.split(",")]

    raw = {b: raw_forward(b) for b in map(int, args.raw_batches.split(","))}
    best_batch = max(raw, key=raw.get)
    print("raw in-process forward: " + ", ".join(f"batch {b} {r:.1f} images/s" for b, r in raw.items()), flush=True)

    rows = []
    for spec in args.servers.split(";"):
        name, _, extra = spec.partition(":")
        server = {"editserve": Editserve, "torchserve": TorchServe}[name](args, extra.split())
        try:
            load(server.url, max(levels), 5, server.pid)  # warm-up
            for c in levels:
                runs = [load(server.url, c, args.seconds, server.pid) for _ in range(args.runs)]
                mean = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}
                rows.append((spec, c, mean))
                print(f"{spec:45s} c={c:<3d} {mean['rps']:7.1f} req/s  p50 {mean['p50']:7.1f} ms  p99 {mean['p99']:7.1f} ms  "
                      f"cores {mean['cores']:4.2f}  failures {mean['failures']:.0f}", flush=True)
        finally:
            server.stop()
    raw_after = raw_forward(best_batch)
    reference = (raw[best_batch] + raw_after) / 2
    print(f"\nraw forward batch {best_batch}: {raw[best_batch]:.1f} before, {raw_after:.1f} after; reference {reference:.1f} images/s\n")
    print("| server | " + " | ".join(f"c={c}" for c in levels) + " | cores at c=" + str(max(levels)) + " |")
    print("|---|" + "---|" * (len(levels) + 1))
    for spec in dict.fromkeys(r[0] for r in rows):
        cells = {c: m for s, c, m in rows if s == spec}
        print(f"| {spec} | " + " | ".join(f"{cells[c]['rps']:.1f} ({cells[c]['rps'] / reference:.2f}x raw)" for c in levels)
              + f" | {cells[max(levels)]['cores']:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
