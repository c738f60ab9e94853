"""Traces an editserve model package (model.safetensors + config.json) of an EfficientNet-Lite into a
TorchScript file for TorchServe. The model is built as tools/reference.py builds it (efficientnet-lite-pytorch,
strict load but for BatchNorm's batch counters), in eval mode, and traced on the package's input size; the
traced module is checked against the eager one on a batch of 3 before it is written.

Usage: python export_model.py --package ../../models/efficientnet-lite0 --out build/lite0.pt
"""
import argparse
import json
import os

import torch
from safetensors.torch import load_file


def reference_model(package):
    with open(os.path.join(package, "config.json")) as f:
        config = json.load(f)
    arch = config["architecture"]
    if not arch.startswith("efficientnet-lite"):
        raise SystemExit(f"{package}: {arch} is no EfficientNet-Lite; this exporter only builds those")
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name(arch, num_classes=config["num_classes"])
    state = load_file(os.path.join(package, "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
    return model.eval(), config


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--package", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    model, config = reference_model(args.package)
    h, w = config["input_size"]
    traced = torch.jit.trace(model, torch.randn(1, 3, h, w))
    check = torch.randn(3, 3, h, w)
    diff = (traced(check) - model(check)).abs().max().item()
    if diff > 1e-4:
        raise SystemExit(f"traced model differs from the eager one by {diff}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    traced.save(args.out)
    print(f"wrote {args.out}: {config['architecture']}, input {h}x{w}, traced vs eager max |diff| {diff:.2e}")


if __name__ == "__main__":
    main()
