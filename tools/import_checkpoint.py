"""Converts a PyTorch checkpoint (.pth/.pt, torch.save's pickle) to safetensors under its state-dict
names, for `editserve import`, which feeds this script to the venv's Python on standard input.

Accepts a plain state dict, or a training checkpoint holding one under 'state_dict' or 'model'; strips
the 'module.' prefix that DataParallel/DistributedDataParallel add. Reads with weights_only=True: a
checkpoint is user input, and a full pickle could run arbitrary code.

Usage: python tools/import_checkpoint.py --checkpoint my.pth --out model.safetensors
"""
import argparse
import pickle
import sys

import torch
from safetensors.torch import save_file

NESTED_STATE_DICT_KEYS = ("state_dict", "model")
PARALLEL_PREFIX = "module."


def fail(message):
    print(f"import_checkpoint: {message}", file=sys.stderr)
    sys.exit(1)


def state_dict_of(checkpoint):
    if not isinstance(checkpoint, dict):
        fail(f"the checkpoint holds a {type(checkpoint).__name__}, not a state dict; "
             "save model.state_dict() instead")
    for key in NESTED_STATE_DICT_KEYS:
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    return checkpoint


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    try:
        checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        fail(f"{args.checkpoint} holds more than tensors and containers, which are not read for safety "
             f"(save model.state_dict() instead): {e}")
    except Exception as e:  # noqa: BLE001 - any reading failure is reported the same way
        fail(f"cannot read {args.checkpoint}: {e}")

    tensors = {}
    for name, value in state_dict_of(checkpoint).items():
        if not isinstance(value, torch.Tensor):
            fail(f"entry '{name}' is a {type(value).__name__}, not a tensor")
        name = name.removeprefix(PARALLEL_PREFIX)
        # Safetensors refuses tensors that share memory or are views; every tensor gets its own storage.
        tensors[name] = value.detach().contiguous().clone()
    if not tensors:
        fail(f"{args.checkpoint} holds no tensors")
    save_file(tensors, args.out)


if __name__ == "__main__":
    main()
