"""The prompt-strategy interface, its registry and its config section.

A strategy turns (class, image index within the class, a per-image random stream) into one prompt
and the attributes to record with the image. Anything expensive (a language model writing
captions) happens once in :meth:`PromptStrategy.prepare`; after that a prompt is a cheap, pure
function of its inputs, so the plan can be streamed and any image's prompt recomputed alone.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, ClassVar

from pydantic import model_validator

from synclone.config import StrictModel, validate
from synclone.errors import UserError
from synclone.labels import LabelSpace

CLASS_SLOT = "{c}"


@dataclass(frozen=True)
class Prompt:
    """One image's prompt and what to record about how it was chosen."""

    text: str
    attributes: dict[str, Any] = field(default_factory=dict)


class NoOptions(StrictModel):
    """A strategy without options."""


class PromptStrategy:
    """Base class; subclasses set ``name`` and ``Options`` and implement :meth:`prompt`."""

    name: ClassVar[str]
    Options: ClassVar[type[StrictModel]] = NoOptions

    def __init__(self, options: StrictModel, label_space: LabelSpace, seed: int):
        """Validate everything the strategy needs (files, classes) here, before any image is made."""
        self.options = options
        self.label_space = label_space
        self.seed = seed

    def prepare(self, images_per_class: int) -> dict:
        """One-off work before the plan is written; returns facts to record in ``dataset.json``."""
        return {}

    def prompt(self, label: int, k: int, rng: random.Random) -> Prompt:
        """The prompt of image ``k`` of class ``label``; ``rng`` is this image's own random stream."""
        raise NotImplementedError


STRATEGIES: dict[str, type[PromptStrategy]] = {}


def register_strategy(cls: type[PromptStrategy]) -> type[PromptStrategy]:
    """Class decorator adding a strategy to the registry under ``cls.name``."""
    if cls.name in STRATEGIES and STRATEGIES[cls.name] is not cls:
        raise ValueError(f"prompt strategy '{cls.name}' is registered twice")
    STRATEGIES[cls.name] = cls
    return cls


def list_strategies() -> list[str]:
    return sorted(STRATEGIES)


def _strategy_class(name: str) -> type[PromptStrategy]:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise UserError(f"unknown prompt strategy '{name}': use one of {', '.join(list_strategies())}") from None


class PromptConfig(StrictModel):
    """The ``prompts`` config section: a strategy, its options and an optional negative prompt.

    ``negative_prompt`` may contain ``{c}`` for the class name. ``options`` are checked against the
    strategy's own options model, so a misspelt option is an error naming it.
    """

    strategy: str = "classname"
    negative_prompt: str | None = None
    options: dict[str, Any] = {}

    @model_validator(mode="after")
    def _check_options(self) -> PromptConfig:
        strategy_options(self)
        return self


def strategy_options(cfg: PromptConfig) -> StrictModel:
    """``cfg.options`` validated into the chosen strategy's options model."""
    cls = _strategy_class(cfg.strategy)
    return validate(cls.Options, dict(cfg.options), source=f"prompts.options (strategy '{cfg.strategy}')")


def create_strategy(cfg: PromptConfig, label_space: LabelSpace, seed: int) -> PromptStrategy:
    """The configured strategy, ready for :meth:`PromptStrategy.prepare`."""
    return _strategy_class(cfg.strategy)(strategy_options(cfg), label_space, seed)


def fill(template: str, class_name: str) -> str:
    """Put the class name into a template's ``{c}`` slot (plain replace: other braces stay as written)."""
    return template.replace(CLASS_SLOT, class_name)


def check_template(template: str, what: str) -> str:
    if CLASS_SLOT not in template:
        raise UserError(f"{what} '{template}' has no {CLASS_SLOT} slot for the class name")
    return template


def read_data(name: str) -> dict:
    """A JSON data file shipped in ``synclone/prompts/data``."""
    text = resources.files("synclone.prompts").joinpath("data", name).read_text(encoding="utf-8")
    return json.loads(text)
