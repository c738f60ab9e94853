"""Reference outputs for the parity and end-to-end tests, computed with the upstream PyTorch code
(efficientnet-lite-pytorch, or torchvision for its architectures).

  logits   --package DIR --input in.safetensors --out out.safetensors
      the reference model's logits for the tensor "input" (N x 3 x H x W)
  hooks    --package DIR --input in.safetensors --out out.safetensors --layer NAME [--layer NAME ...]
      one forward pass with forward hooks: for every editable layer NAME (a conv, by its state-dict prefix),
      "key:NAME", the conv's input, and "value:NAME", the output of the block the conv feeds, as the
      editing method defines it and editserve's architectures implement it
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


def identity(x):
    return x


def relu6(x):
    return x.clamp(0.0, 6.0)


def value_point(model, architecture, layer):
    """Where the reference model holds the value of an editable layer (the key is the input of the conv
    module `layer` itself): the module whose output gives the value, and the function from that output to
    the value (the identity but where the block ends in an activation that is no module of its own)."""
    if architecture.startswith("efficientnet-lite"):
        if layer == "_conv_head":
            # The head's ReLU6 is the network's shared `_swish` module, which also runs elsewhere.
            return "_bn1", relu6
        # `_blocks.i._project_conv` feeds the rest of MBConv block i: bn2 [+ skip].
        return layer.rsplit(".", 1)[0], identity
    if architecture.startswith("resnet"):
        # `layerX.Y.convN`, the block's last conv, feeds bnN, the shortcut add and the ReLU: all of `layerX.Y`.
        return layer.rsplit(".", 1)[0], identity
    if architecture.startswith("vgg"):
        # A conv of `features` feeds [BN,] ReLU [and the stage's max-pool]: the block ends before the next conv.
        names = [name for name, _ in model.features.named_children()]
        end = names.index(layer.split(".", 1)[1]) + 1
        while end < len(names) and not isinstance(model.features[end], torch.nn.Conv2d):
            end += 1
        return f"features.{names[end - 1]}", identity
    if architecture.startswith("squeezenet"):
        if layer == "classifier.1":
            return "classifier.2", identity
        fire, conv = layer.rsplit(".", 1)
        if conv == "squeeze":
            return f"{fire}.squeeze_activation", identity
        # An expand's block is the whole fire module, the concatenation of both expands (see squeezenet.rs).
        return fire, identity
    raise SystemExit(f"no value hook for {architecture}")


def hooked_keys_and_values(model, architecture, layers, x):
    """Runs the model once on `x` with hooks at every layer's key and value; returns "key:NAME" and
    "value:NAME" for each."""
    captured = {}
    modules = dict(model.named_modules())

    def store(name, tensor):
        assert name not in captured, f"{name} captured twice: the module runs more than once"
        # A copy: torchvision's ReLUs are in place and would overwrite a tensor kept by reference.
        captured[name] = tensor.detach().clone().contiguous()

    handles = []
    for layer in layers:
        value_module, to_value = value_point(model, architecture, layer)
        handles.append(modules[layer].register_forward_pre_hook(
            lambda _m, inputs, layer=layer: store(f"key:{layer}", inputs[0])))
        handles.append(modules[value_module].register_forward_hook(
            lambda _m, _inputs, output, layer=layer, to_value=to_value: store(f"value:{layer}", to_value(output))))
    model(x)
    for handle in handles:
        handle.remove()
    missing = [f"{kind}:{layer}" for layer in layers for kind in ("key", "value") if f"{kind}:{layer}" not in captured]
    assert not missing, f"hooks never ran: {missing}"
    return captured


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
    hooks = sub.add_parser("hooks")
    hooks.add_argument("--package", required=True)
    hooks.add_argument("--input", required=True)
    hooks.add_argument("--out", required=True)
    hooks.add_argument("--layer", action="append", required=True, help="an editable layer; repeat for more")
    classify = sub.add_parser("classify")
    classify.add_argument("--package", required=True)
    classify.add_argument("images", nargs="+")
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    model, config = reference_model(args.package)
    if args.command == "logits":
        x = load_file(args.input)["input"]
        save_file({"logits": model(x).contiguous()}, args.out)
    elif args.command == "hooks":
        x = load_file(args.input)["input"]
        save_file(hooked_keys_and_values(model, config["architecture"], args.layer, x), args.out)
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
