"""Prompt strategies in one registry.

``classname``, ``clip_templates``, ``diverse``, ``captions``, ``contexts`` and ``file``; see
:func:`list_strategies`. A strategy is built from the ``prompts`` config section::

    strategy = create_strategy(PromptConfig(strategy="clip_templates"), label_space, seed=0)
    strategy.prepare(images_per_class)            # one-off work (e.g. a caption model)
    strategy.prompt(label, k, rng).text           # image k of class `label`

Template lists are data files under ``synclone/prompts/data`` (each names its source).
"""

from synclone.prompts import captions, contexts, templates  # noqa: F401  (registers the strategies)
from synclone.prompts.base import (
    STRATEGIES,
    Prompt,
    PromptConfig,
    PromptStrategy,
    create_strategy,
    list_strategies,
    register_strategy,
)
from synclone.prompts.templates import openai_imagenet_templates

__all__ = [
    "STRATEGIES",
    "Prompt",
    "PromptConfig",
    "PromptStrategy",
    "create_strategy",
    "list_strategies",
    "openai_imagenet_templates",
    "register_strategy",
]
