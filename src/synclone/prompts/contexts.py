"""Context prompts: the class in common and uncommon times of day, weather and locations."""

from __future__ import annotations

import random

from pydantic import Field

from synclone.config import StrictModel
from synclone.prompts.base import Prompt, PromptStrategy, register_strategy
from synclone.prompts.templates import Mode, pick


@register_strategy
class Contexts(PromptStrategy):
    """The class in common and uncommon times of day, weather and locations (FOCUS-style context probes).

    Settings come from :func:`synclone.robustness.context.context_prompts`; each class gets one list
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
            from synclone.generate.seeds import derived_rng
            from synclone.robustness.context import context_prompts

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
