"""Writing a model package: model.safetensors (written atomically) beside config.json."""
import json
import os

from safetensors.torch import save_file


def write_package(out, tensors, config):
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, "model.safetensors.tmp")
    save_file(tensors, tmp)
    os.replace(tmp, os.path.join(out, "model.safetensors"))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    print(f"wrote {out}: {len(tensors)} tensors")
