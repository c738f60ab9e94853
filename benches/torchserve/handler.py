"""TorchServe handler for the EfficientNet-Lite TorchScript model that setup.sh archives.

Preprocessing follows the package's config.json ("preprocessing"), as editserve and tools/reference.py do:
EXIF orientation, RGB, resize the shorter side (PIL, the configured interpolation), centre crop,
(pixel / pixel_scale - mean) / std, channel order. It is torchvision's Resize + CenterCrop + PILToTensor on a
PIL image, written out with PIL and numpy so that the venv needs no torchvision.

A batch of requests (TorchServe's batchSize > 1) runs as one forward pass. Each image's response is
TorchServe's image_classifier format: the top 5 classes as {"<class index>": probability}.

Threads: BENCH_TORCH_THREADS (set by serve.sh --threads) sets torch's intra-op threads per worker process;
unset, torch's own default (one per core) stands. Inter-op threads are set to 1 whenever it is set.
"""
import base64
import io
import json
import logging
import os

import numpy as np
import torch
from PIL import Image, ImageOps

from ts.torch_handler.base_handler import BaseHandler

logger = logging.getLogger(__name__)

TOPK = 5
INTERPOLATION = {
    "nearest": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
}


def resize_shorter(image, size, interpolation):
    """torchvision.transforms.Resize(size) on a PIL image: the shorter side becomes `size`, the longer
    int(size * long / short)."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return image
    return image.resize((new_w, new_h), interpolation)


def center_crop(image, crop_h, crop_w):
    """torchvision.transforms.CenterCrop on a PIL image no smaller than the crop."""
    w, h = image.size
    if w < crop_w or h < crop_h:
        raise ValueError(f"image {w}x{h} is smaller than the {crop_w}x{crop_h} crop")
    top = int(round((h - crop_h) / 2.0))
    left = int(round((w - crop_w) / 2.0))
    return image.crop((left, top, left + crop_w, top + crop_h))


class EfficientNetLiteHandler(BaseHandler):
    def initialize(self, context):
        threads = os.environ.get("BENCH_TORCH_THREADS")
        if threads:
            torch.set_num_threads(int(threads))
            try:
                torch.set_num_interop_threads(1)
            except RuntimeError:
                pass  # already set, or parallel work has started: leave it
        super().initialize(context)
        model_dir = context.system_properties.get("model_dir")
        with open(os.path.join(model_dir, "config.json")) as f:
            config = json.load(f)
        pre = config["preprocessing"]
        self.resize = int(pre["resize_shorter"])
        self.crop_h, self.crop_w = (int(v) for v in pre["crop"])
        self.interpolation = INTERPOLATION[pre["interpolation"]]
        self.bgr = pre["channel_order"] == "bgr"
        self.pixel_scale = float(pre["pixel_scale"])
        self.mean = torch.tensor(pre["mean"], dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(pre["std"], dtype=torch.float32).view(3, 1, 1)
        self.mapping = None  # keys are class indices, as the brief for the benchmark asks
        torch.set_grad_enabled(False)
        logger.info(
            "lite0 handler: torch %s, %d intra-op / %d inter-op threads, device %s, preprocessing %s",
            torch.__version__, torch.get_num_threads(), torch.get_num_interop_threads(), self.device, pre,
        )

    def _image_tensor(self, payload):
        if isinstance(payload, str):
            payload = base64.b64decode(payload)
        image = Image.open(io.BytesIO(payload))
        image = ImageOps.exif_transpose(image).convert("RGB")
        image = center_crop(resize_shorter(image, self.resize, self.interpolation), self.crop_h, self.crop_w)
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float()
        if self.bgr:
            x = x.flip(0)
        return (x / self.pixel_scale - self.mean) / self.std

    def preprocess(self, data):
        images = []
        for row in data:
            payload = row.get("data") if isinstance(row, dict) else None
            if payload is None and isinstance(row, dict):
                payload = row.get("body")
            if payload is None:
                raise ValueError("request has no body")
            images.append(self._image_tensor(payload))
        return torch.stack(images).to(self.device)

    def inference(self, data, *args, **kwargs):
        with torch.inference_mode():
            return self.model(data)

    def postprocess(self, data):
        probs, classes = torch.topk(data.float().softmax(dim=1), TOPK, dim=1)
        return [
            {str(c): p for c, p in zip(row_classes, row_probs)}
            for row_classes, row_probs in zip(classes.tolist(), probs.tolist())
        ]
