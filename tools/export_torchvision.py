"""Writes a model package (model.safetensors + config.json) of a randomly initialised torchvision
classifier, under torchvision's state-dict key names: a fixture for the parity tests of the native
architectures, with no trained weights to download.

BatchNorm is randomised beyond torchvision's initialisation (running mean 0, variance 1, weight 1, bias 0,
which would make a BatchNorm that is skipped or misapplied invisible), and so are the conv and linear
biases, which torchvision initialises to 0.

Usage: python tools/export_torchvision.py --arch resnet50 --out DIR [--seed N]
"""
import argparse
import os
import sys

import torch
import torchvision

sys.path.insert(0, os.path.dirname(__file__))
from package import write_package  # noqa: E402

# The torchvision architectures editserve implements natively, and the EfficientNet-Lite variants (built by
# efficientnet-lite-pytorch, the reference of the EfficientNet-Lite parity tests).
ARCHITECTURES = ("resnet18", "resnet34", "resnet50", "resnet101", "vgg16", "vgg16_bn", "squeezenet1_1") + tuple(
    f"efficientnet-lite{v}" for v in range(5)
)
NUM_CLASSES = 1000
SIZE = 224

# torchvision's ImageNet evaluation transform.
PREPROCESSING = {
    "resize_shorter": 256,
    "crop": [SIZE, SIZE],
    "interpolation": "bilinear",
    "channel_order": "rgb",
    "pixel_scale": 255.0,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}


@torch.no_grad()
def randomise(model, generator):
    def uniform(tensor, low, high):
        tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)

    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            uniform(module.running_mean, -0.5, 0.5)
            uniform(module.running_var, 0.5, 2.0)
            uniform(module.weight, 0.5, 1.5)
            uniform(module.bias, -0.5, 0.5)
        elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and module.bias is not None:
            uniform(module.bias, -0.1, 0.1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", choices=ARCHITECTURES, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    if args.arch.startswith("efficientnet-lite"):
        from efficientnet_lite_pytorch import EfficientNet

        model = EfficientNet.from_name(args.arch, num_classes=NUM_CLASSES)
        # Its convs pad for this resolution ("SAME" computed once), so inputs must have it.
        size = model._global_params.image_size
        preprocessing = dict(PREPROCESSING, resize_shorter=size + 32, crop=[size, size])
    else:
        model = torchvision.models.get_model(args.arch, weights=None, num_classes=NUM_CLASSES)
        size, preprocessing = SIZE, PREPROCESSING
    randomise(model, torch.Generator().manual_seed(args.seed))
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    config = {
        "architecture": args.arch,
        "num_classes": NUM_CLASSES,
        "input_size": [size, size],
        "preprocessing": preprocessing,
        "labels": [f"class {i}" for i in range(NUM_CLASSES)],
    }
    write_package(args.out, tensors, config)


if __name__ == "__main__":
    main()
