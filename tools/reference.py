"""Reference outputs for the parity and end-to-end tests, computed with the upstream PyTorch code
(efficientnet-lite-pytorch, or torchvision for its architectures).

  logits   --package DIR --input in.safetensors --out out.safetensors
      the reference model's logits for the tensor "input" (N x 3 x H x W)
  classify --package DIR IMAGE...
      the PIL/torchvision preprocessing that config.json declares, then the reference model; prints one JSON
      line per image: {"path", "top1", "probability"}
"""
import argparse
import json
import os

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
import torchvision.transforms as T


def reference_model(package):
    with open(os.path.join(package, "config.json")) as f:
        config = json.load(f)
    arch = config["architecture"]
    if arch.startswith("efficientnet-lite"):
        from efficientnet_lite_pytorch import EfficientNet

        model = EfficientNet.from_name(arch, num_classes=config["num_classes"])
    else:
        import torchvision

        if arch not in torchvision.models.list_models(module=torchvision.models):
            raise SystemExit(f"no reference for {arch}")
        model = torchvision.models.get_model(arch, weights=None, num_classes=config["num_classes"])
    state = load_file(os.path.join(package, "model.safetensors"))
    # Strict but for BatchNorm's batch counters, which packages leave out.
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
    return model.eval(), config


def pil_pipeline(pre):
    interpolation = {
        "nearest": T.InterpolationMode.NEAREST,
        "bilinear": T.InterpolationMode.BILINEAR,
        "bicubic": T.InterpolationMode.BICUBIC,
    }[pre["interpolation"]]
    mean = torch.tensor(pre["mean"]).view(3, 1, 1)
    std = torch.tensor(pre["std"]).view(3, 1, 1)

    def run(image):
        image = T.CenterCrop(pre["crop"])(T.Resize(pre["resize_shorter"], interpolation=interpolation)(image))
        x = T.PILToTensor()(image).float()
        if pre["channel_order"] == "bgr":
            x = x.flip(0)
        return (x / pre["pixel_scale"] - mean) / std

    return run


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    logits = sub.add_parser("logits")
    logits.add_argument("--package", required=True)
    logits.add_argument("--input", required=True)
    logits.add_argument("--out", required=True)
    classify = sub.add_parser("classify")
    classify.add_argument("--package", required=True)
    classify.add_argument("images", nargs="+")
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    model, config = reference_model(args.package)
    if args.command == "logits":
        x = load_file(args.input)["input"]
        save_file({"logits": model(x).contiguous()}, args.out)
    else:
        from PIL import ImageOps

        run = pil_pipeline(config["preprocessing"])
        for path in args.images:
            image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
            probs = model(run(image).unsqueeze(0)).softmax(-1)[0]
            top = int(probs.argmax())
            print(json.dumps({"path": path, "top1": top, "probability": float(probs[top])}))


if __name__ == "__main__":
    main()
