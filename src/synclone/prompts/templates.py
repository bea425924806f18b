"""Template strategies: class name, CLIP's 80 ImageNet templates, diverse compositions, user files."""

from __future__ import annotations

import json
import random
from functools import lru_cache
from pathlib import Path
from typing import Literal

import yaml

from synclone.config import StrictModel
from synclone.errors import UserError
from synclone.labels import LabelSpace
from synclone.prompts.base import Prompt, PromptStrategy, check_template, fill, read_data, register_strategy

Mode = Literal["in_turn", "random"]


def pick(items: list, k: int, rng: random.Random, mode: str) -> int:
    """Index of image ``k``'s item: in turn (balanced, k mod n) or drawn from the image's own stream."""
    return k % len(items) if mode == "in_turn" else rng.randrange(len(items))


@register_strategy
class ClassName(PromptStrategy):
    """One template for every image, by default "a photo of a {c}."."""

    name = "classname"

    class Options(StrictModel):
        template: str = "a photo of a {c}."

    def __init__(self, options, label_space, seed):
        super().__init__(options, label_space, seed)
        check_template(options.template, "prompts.options.template")

    def prompt(self, label: int, k: int, rng: random.Random) -> Prompt:
        return Prompt(fill(self.options.template, self.label_space.classes[label]))


@lru_cache(maxsize=1)
def openai_imagenet_templates() -> tuple[str, ...]:
    """The 80 CLIP ImageNet templates with a ``{c}`` slot (see ``data/openai_imagenet_templates.json``)."""
    return tuple(read_data("openai_imagenet_templates.json")["templates"])


@register_strategy
class ClipTemplates(PromptStrategy):
    """OpenAI's 80 ImageNet prompt templates for CLIP, one per image, in turn or at random."""

    name = "clip_templates"

    class Options(StrictModel):
        mode: Mode = "in_turn"

    def prompt(self, label: int, k: int, rng: random.Random) -> Prompt:
        templates = openai_imagenet_templates()
        j = pick(list(templates), k, rng, self.options.mode)
        return Prompt(fill(templates[j], self.label_space.classes[label]), {"template": j})


@register_strategy
class Diverse(PromptStrategy):
    """A random template per image with random style, viewpoint, setting and lighting slots.

    The lists come from ``data/diverse.json`` or from a user file of the same shape:
    ``{"templates": ["{style} of a {c} {setting}", ...], "slots": {"style": [...], ...}}``.
    """

    name = "diverse"

    class Options(StrictModel):
        file: str | None = None

    def __init__(self, options, label_space, seed):
        super().__init__(options, label_space, seed)
        data = read_data("diverse.json") if options.file is None else _read_mapping(Path(options.file))
        templates, slots = data.get("templates"), data.get("slots") or {}
        if not templates or not isinstance(templates, list):
            raise UserError("diverse prompts: the file needs a non-empty 'templates' list")
        for t in templates:
            check_template(t, "diverse template")
            for name in _slot_names(t):
                if not slots.get(name):
                    raise UserError(f"diverse template '{t}' uses the slot '{{{name}}}' but 'slots' has no list for it")
        self.templates = [str(t) for t in templates]
        self.slots = {k: [str(v) for v in vs] for k, vs in slots.items()}

    def prompt(self, label: int, k: int, rng: random.Random) -> Prompt:
        j = rng.randrange(len(self.templates))
        text = self.templates[j]
        attributes: dict = {"template": j}
        # Every slot is drawn (used or not) so each attribute column exists for every image.
        for name in sorted(self.slots):
            value = self.slots[name][rng.randrange(len(self.slots[name]))]
            if "{" + name + "}" in text:
                text = text.replace("{" + name + "}", value)
                attributes[name] = value
            else:
                attributes[name] = None
        return Prompt(fill(text, self.label_space.classes[label]), attributes)


def _slot_names(template: str) -> list[str]:
    import string

    return [f for _, f, _, _ in string.Formatter().parse(template) if f and f != "c"]


def _read_mapping(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"prompt file '{path}' does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise UserError(f"prompt file '{path}' cannot be parsed: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"prompt file '{path}' must hold a mapping, not {type(data).__name__}")
    return data


@register_strategy
class FilePrompts(PromptStrategy):
    """User-written prompts per class from a YAML or JSON file: ``{class name or slug: [prompt, ...]}``.

    Every class of the label space needs an entry (a list or one string); a missing or unknown class
    is an error before any image is made. ``{c}`` in a prompt is replaced by the class name.
    """

    name = "file"

    class Options(StrictModel):
        path: str
        mode: Mode = "in_turn"

    def __init__(self, options, label_space: LabelSpace, seed):
        super().__init__(options, label_space, seed)
        data = _read_mapping(Path(options.path))
        per_class: dict[int, list[str]] = {}
        unknown = []
        for key, value in data.items():
            try:
                label = label_space.index(str(key))
            except UserError:
                unknown.append(str(key))
                continue
            prompts = [value] if isinstance(value, str) else value
            ok = isinstance(prompts, list) and prompts and all(isinstance(p, str) and p.strip() for p in prompts)
            if not ok:
                raise UserError(f"prompt file '{options.path}': '{key}' needs a prompt or a non-empty list of prompts")
            if label in per_class:
                raise UserError(f"prompt file '{options.path}': class '{label_space.classes[label]}' is listed twice")
            per_class[label] = list(prompts)
        missing = [c for i, c in enumerate(label_space.classes) if i not in per_class]
        if missing:
            raise UserError(
                f"prompt file '{options.path}' has no prompts for {len(missing)} of {len(label_space)} classes "
                f"({_short(missing)}): add an entry for each class"
            )
        if unknown:
            raise UserError(
                f"prompt file '{options.path}' lists classes not in label space '{label_space.name}' "
                f"({_short(unknown)}): fix the names or the label space"
            )
        self.per_class = per_class

    def prompt(self, label: int, k: int, rng: random.Random) -> Prompt:
        prompts = self.per_class[label]
        j = pick(prompts, k, rng, self.options.mode)
        return Prompt(fill(prompts[j], self.label_space.classes[label]), {"prompt_index": j})


def _short(items: list[str], limit: int = 5) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(f"'{x}'" for x in items[:limit]) + more
