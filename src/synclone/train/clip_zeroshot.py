"""Zero-shot CLIP heads: one text embedding per class, averaged over prompt templates.

class weight = normalise(mean over templates of normalise(text_embedding(template.format(class))))
logits       = logit_scale * cosine(image embedding, class weight)

This is CLIP's prompt-ensembling recipe (Radford et al., 2021), as open_clip's
``build_zero_shot_classifier`` computes it; for open_clip models that function is used directly, and
the transformers path computes the same formula.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from synclone.errors import UserError
from synclone.models.backbones import Backbone

Template = str | Callable[[str], str]


def template_sets() -> dict[str, tuple[Template, ...]]:
    """Named template lists. The ImageNet ones are open_clip's copies of OpenAI's published prompts."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    return {
        "openai_imagenet": tuple(OPENAI_IMAGENET_TEMPLATES),  # 80 prompts
        "simple_imagenet": tuple(SIMPLE_IMAGENET_TEMPLATES),  # OpenAI's 7-prompt subset
        "photo": ("a photo of a {}.",),
        "classname": ("{}",),
    }


def resolve_templates(spec: str | Sequence[str]) -> tuple[Template, ...]:
    """A template-set name, or a list of format strings each holding one ``{}`` for the class name."""
    if isinstance(spec, str):
        sets = template_sets()
        if spec not in sets:
            raise UserError(f"unknown template set '{spec}': use one of {', '.join(sets)} or a list of strings "
                            "with '{}' where the class name goes")
        return sets[spec]
    templates = tuple(spec)
    if not templates:
        raise UserError("the template list is empty: give at least one, e.g. ['a photo of a {}.']")
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise UserError(f"template {t!r} must contain '{{}}' exactly once (where the class name goes)")
    return templates


def _render(template: Template, name: str) -> str:
    return template(name) if callable(template) else template.format(name)


def zeroshot_weights(backbone: Backbone, classnames: Sequence[str], templates: str | Sequence[str] = "openai_imagenet",
                     device: str | torch.device = "cpu") -> torch.Tensor:
    """Class weights (C, D), each row unit-norm, for a CLIP backbone (open_clip or transformers)."""
    if not backbone.is_clip:
        raise UserError(f"backbone '{backbone.config.name}' ({backbone.config.kind}) has no text tower: zero-shot "
                        "weights need a CLIP model (kind open_clip or hf_clip)")
    temps = resolve_templates(templates)
    names = [str(c) for c in classnames]
    model = backbone.clip_model
    if backbone.config.kind == "open_clip":
        from open_clip import build_zero_shot_classifier

        w = build_zero_shot_classifier(model, backbone.tokenizer, names, list(temps), num_classes_per_batch=10,
                                       device=device)
        return w.T.float().contiguous().cpu()
    rows = []
    with torch.inference_mode():
        for name in names:
            ids = backbone.tokenizer([_render(t, name) for t in temps]).to(device)
            out = model.get_text_features(input_ids=ids, attention_mask=(ids != 0).long())
            emb = out if isinstance(out, torch.Tensor) else out.pooler_output
            rows.append(F.normalize(F.normalize(emb.float(), dim=-1).mean(dim=0), dim=-1))
    return torch.stack(rows).contiguous().cpu()


def zeroshot_logits(features: torch.Tensor, weights: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """``logit_scale * cos(features, weights)`` for (N, D) features and (C, D) weights."""
    return logit_scale * F.normalize(features, dim=-1) @ weights.T
