"""What the third-party client checks share: their command line and the way a check passes or stops the run."""
import argparse
import sys


def arguments(description):
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--photo", required=True, help="an image the model classifies as --label")
    ap.add_argument("--label", type=int, required=True)
    ap.add_argument("--pixels", required=True, help="the photo preprocessed: 3 x H x W little-endian float32")
    ap.add_argument("--token", help="a bearer token of the infer scope")
    return ap.parse_args()


def check(condition, what):
    if not condition:
        sys.exit(f"FAILED: {what}")
    print(f"ok: {what}")
