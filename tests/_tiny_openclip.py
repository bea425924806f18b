"""A tiny open_clip model built locally from a custom JSON config (nothing is downloaded).

``build_tiny_openclip(folder)`` writes two loadable forms of the same weights:

- ``folder/clip/``: open_clip's ``local-dir:`` layout (``open_clip_config.json`` + ``open_clip_model.safetensors``);
- ``folder/tiny_clip_test.json`` + ``folder/tiny_clip_test.safetensors``: a model-config file and a checkpoint,
  loaded by path (``BackboneConfig(name=<json>, pretrained=<safetensors>)``).

With ``train_steps > 0`` the two towers are first trained for a few seconds so that the zero-shot head
(text embeddings of "a photo of a {class}") classifies Fashion-MNIST above chance; tests then check real
behaviour (zero-shot accuracy, tuning gains) instead of a random model's noise. The open_clip tokenizer
works offline from its bundled BPE file, so the text side is the real CLIP text pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

# A ViT image tower at 32x32 with 4x4 = 16 patches and a 2-layer text transformer; ~1.8M parameters,
# most of them the 49408-token embedding the real CLIP tokenizer needs.
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TRAIN_TEMPLATES = ("a photo of a {}.", "a {}.", "a picture of the {}.")


def _train_zero_shot(model: torch.nn.Module, steps: int, seed: int) -> None:
    """Fit both towers so image embeddings land near the text embedding of their class name (CLIP's loss
    restricted to the class captions): a few hundred steps at 32x32 take a few seconds on a CPU."""
    import open_clip

    from synclone.data import load_fashion_mnist
    from synclone.models.backbones import Preprocess

    data = load_fashion_mnist("train")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data), generator=g)[:4096]
    data = data.subset(idx)
    tok = open_clip.get_tokenizer("ViT-B-32")  # the SimpleTokenizer; context length cut to the tiny model's
    pre = Preprocess(size=(32, 32), mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD)
    texts = [[t.format(c) for c in data.label_space.classes] for t in TRAIN_TEMPLATES]
    tokens = [tok(t)[:, :32] for t in texts]
    # The 49408 x 32 token table stays random (a fixed code is enough for 10 prompts), which halves the cost.
    model.token_embedding.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0,
                            foreach=True)
    model.train()
    for step in range(steps):
        b = torch.randint(0, len(data), (64,), generator=g)
        x, y = data.batch(b)
        img = F.normalize(model.encode_image(pre(x)), dim=-1)
        txt = F.normalize(model.encode_text(tokens[step % len(tokens)]), dim=-1)
        loss = F.cross_entropy(model.logit_scale.exp() * img @ txt.T, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.token_embedding.requires_grad_(True)
    model.eval()


def build_tiny_openclip(folder: str | Path, train_steps: int = 120, seed: int = 0) -> dict[str, Path]:
    """Write the tiny model (once per folder) and return the paths of its two forms."""
    import open_clip
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    folder = Path(folder)
    local_dir = folder / "clip"
    cfg_file = folder / "tiny_clip_test.json"
    ckpt = folder / "tiny_clip_test.safetensors"
    paths = {"local_dir": local_dir, "config": cfg_file, "checkpoint": ckpt}
    if (local_dir / "open_clip_model.safetensors").is_file() and ckpt.is_file():
        return paths
    local_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    try:
        # One thread, for this fit only: tiny matmuls gain nothing from a second thread, and on a busy
        # shared machine two spinning threads make them several times slower.
        torch.set_num_threads(1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIP(**json.loads(json.dumps(TINY_CONFIG)))
            if train_steps:
                _train_zero_shot(model, train_steps, seed)
    finally:
        torch.set_num_threads(threads)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    pre = {"size": 32, "mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
           "interpolation": "bicubic", "resize_mode": "shortest"}
    (local_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CONFIG, "preprocess_cfg": pre}))
    save_file(state, str(local_dir / "open_clip_model.safetensors"))
    cfg_file.write_text(json.dumps(TINY_CONFIG))
    save_file(state, str(ckpt))
    return paths
