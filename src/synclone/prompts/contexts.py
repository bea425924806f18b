"""Context prompts: the class in common and uncommon times of day, weather and locations.

Settings come from ``data/contexts.json`` (per class where known, generic otherwise); the context
probe (:mod:`synclone.probes.context`) scores images made from these prompts.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

import numpy as np
from pydantic import Field

from synclone.config import StrictModel
from synclone.errors import UserError
from synclone.labels import read_data_file, slugify
from synclone.prompts.base import Prompt, PromptStrategy, register_strategy
from synclone.prompts.templates import Mode, pick
from synclone.util.seeds import derived_rng

ATTRIBUTES = ("time", "weather", "location")


# --- prompts in common and uncommon contexts ---------------------------------------


def contexts_table() -> dict:
    """The bundled FOCUS-style context table (``data/contexts.json``): settings per class, aliases, template."""
    return read_data_file("contexts.json")


def context_settings(class_name: str) -> dict[str, dict[str, list[str]]]:
    """Common and uncommon phrases per attribute for ``class_name`` (its own entry, an alias's, or the defaults)."""
    data = contexts_table()
    key = slugify(class_name)
    key = data["aliases"].get(key, key)
    own = data["classes"].get(key, {})
    return {a: {k: list(v) for k, v in own.get(a, data["default"][a]).items()} for a in ATTRIBUTES}


def _choice(rng, seq: Sequence[str]) -> str:
    if isinstance(rng, np.random.Generator):
        return seq[int(rng.integers(len(seq)))]
    return rng.choice(list(seq))


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def context_prompts(class_name: str, rng: random.Random | np.random.Generator | int | None = None,
                    n_per_pattern: int = 1) -> list[tuple[str, dict, int]]:
    """Prompts placing ``class_name`` in every feasible mix of common/uncommon time, weather and location.

    Returns ``(prompt, attributes, n_uncommon)`` tuples: one per pattern of the 8 (common or uncommon
    for each attribute) times ``n_per_pattern``, each phrase drawn with ``rng`` (a ``random.Random``, a
    numpy Generator or a seed). ``attributes`` holds ``time``, ``weather``, ``location`` (the phrases)
    and ``time_uncommon``, ``weather_uncommon``, ``location_uncommon``: store them with the image. A
    pattern needing an uncommon value the class lacks (night is common for frogs) is skipped.
    """
    if rng is None or isinstance(rng, int):
        rng = random.Random(rng)
    if n_per_pattern < 1:
        raise UserError(f"n_per_pattern must be at least 1, got {n_per_pattern}")
    settings = context_settings(class_name)
    template = contexts_table()["template"]
    out = []
    for pattern in itertools.product((False, True), repeat=len(ATTRIBUTES)):
        pools = [settings[a]["uncommon" if u else "common"] for a, u in zip(ATTRIBUTES, pattern, strict=True)]
        if not all(pools):
            continue
        for _ in range(n_per_pattern):
            phrases = {a: _choice(rng, pool) for a, pool in zip(ATTRIBUTES, pools, strict=True)}
            prompt = template.format(article=_article(class_name), cls=class_name, **phrases)
            attrs = dict(phrases, **{f"{a}_uncommon": bool(u) for a, u in zip(ATTRIBUTES, pattern, strict=True)})
            out.append((prompt, attrs, int(sum(pattern))))
    return out


@register_strategy
class Contexts(PromptStrategy):
    """The class in common and uncommon times of day, weather and locations (FOCUS-style context probes).

    Settings come from :func:`context_prompts`; each class gets one list
    of (prompt, attributes, number of uncommon attributes) drawn once from a seed of (run seed,
    class), and image ``k`` takes entry ``k`` in turn (balanced over the 8 common/uncommon patterns)
    or one at random.
    """
    name = "contexts"

    class Options(StrictModel):
        mode: Mode = "in_turn"
        n_per_pattern: int = Field(default=4, ge=1)

    def __init__(self, options, label_space, seed):
        super().__init__(options, label_space, seed)
        self._lists: dict[int, list] = {}

    def _list(self, label: int) -> list:
        if label not in self._lists:
            n = self.options.n_per_pattern
            rng = derived_rng(self.seed, "contexts", label)
            items = context_prompts(self.label_space.classes[label], rng, n)
            # context_prompts lists n prompts per pattern, pattern after pattern; interleave them so that
            # images taken in turn cycle through the patterns (balanced even for few images per class).
            self._lists[label] = [items[i] for i in sorted(range(len(items)), key=lambda i: (i % n, i // n))]
        return self._lists[label]

    def prepare(self, images_per_class: int) -> dict:
        return {"prompts_per_class": {c: len(self._list(i)) for i, c in enumerate(self.label_space.classes)}}

    def prompt(self, label: int, k: int, rng: random.Random) -> Prompt:
        items = self._list(label)
        text, attributes, n_uncommon = items[pick(items, k, rng, self.options.mode)]
        return Prompt(text, {**attributes, "n_uncommon": int(n_uncommon)})
