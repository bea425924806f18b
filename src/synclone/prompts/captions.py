"""Caption prompts: a text-to-text language model turns each class name into sentences that contain it.

He et al. (2023, "Is synthetic data from generative models ready for image recognition?") used a
word-to-sentence T5 for this "language enhancement". Any Hugging Face seq2seq model works here, by
hub id or local folder (e.g. ``google/flan-t5-base`` with ``input_template: "Describe a photo of a
{c}."``). Sentences are sampled once per class, cleaned, de-duplicated and (by default) kept only if
they name the class. When fewer unique sentences come back than asked, the ones there are are used
in turn and the shortfall is recorded; a class with none at all falls back to "a photo of a {c}.".
"""

from __future__ import annotations

import random
import re

from pydantic import Field

from synclone.config import StrictModel
from synclone.models.hub import resolve_model
from synclone.prompts.base import Prompt, PromptStrategy, check_template, fill, register_strategy
from synclone.util.seeds import derive_seed

FALLBACK_TEMPLATE = "a photo of a {c}."


@register_strategy
class Captions(PromptStrategy):
    """Sentences about each class written by a seq2seq language model."""
    name = "captions"

    class Options(StrictModel):
        model: str
        revision: str | None = None
        input_template: str = "{c}"
        num_sentences: int | None = Field(default=None, ge=1)  # per class; default min(images_per_class, 64)
        max_new_tokens: int = Field(default=40, ge=1)
        top_p: float = Field(default=0.9, gt=0, le=1)
        temperature: float = Field(default=1.0, gt=0)
        rounds: int = Field(default=3, ge=1)  # sampling rounds per class to reach num_sentences unique ones
        require_class_name: bool = True
        device: str = "cpu"

    def __init__(self, options, label_space, seed):
        super().__init__(options, label_space, seed)
        check_template(options.input_template, "prompts.options.input_template")

        # Resolve now so an unknown model is an error before anything runs.
        self.model = resolve_model(options.model, options.revision, marker="config.json", what="caption model")
        self.sentences: dict[int, list[str]] = {}

    def prepare(self, images_per_class: int) -> dict:
        import torch
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer


        opts = self.options
        want = opts.num_sentences or min(images_per_class, 64)
        kw = {"revision": opts.revision, "local_files_only": self.model.local_files_only}
        tokenizer = AutoTokenizer.from_pretrained(self.model.location, **kw)
        model = AutoModelForSeq2SeqLM.from_pretrained(self.model.location, **kw).to(opts.device).eval()
        shortfall = {}
        for label, class_name in enumerate(self.label_space.classes):
            source = fill(opts.input_template, class_name)
            found: list[str] = []
            # A private RNG stream per class: the sentences depend on (run seed, class) only.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(self.seed, "captions", label))
                for _ in range(opts.rounds):
                    inputs = tokenizer([source], return_tensors="pt").to(opts.device)
                    with torch.no_grad():
                        out = model.generate(
                            **inputs, do_sample=True, top_p=opts.top_p, temperature=opts.temperature,
                            max_new_tokens=opts.max_new_tokens, num_return_sequences=want - len(found),
                        )
                    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
                    found = _unique(found + [t for t in map(_clean, texts) if self._keep(t, class_name)])[:want]
                    if len(found) >= want:
                        break
            if len(found) < want:
                shortfall[class_name] = {"asked": want, "unique": len(found)}
            self.sentences[label] = found or [fill(FALLBACK_TEMPLATE, class_name)]
        return {
            "model": self.model.source,
            "revision": self.model.revision,
            "sentences_per_class": want,
            # Classes that got fewer unique sentences than asked; their sentences are reused in turn.
            "shortfall": shortfall,
        }

    def _keep(self, text: str, class_name: str) -> bool:
        if not text:
            return False
        return not self.options.require_class_name or class_name.lower() in text.lower()

    def prompt(self, label: int, k: int, rng: random.Random) -> Prompt:
        sentences = self.sentences[label]
        j = k % len(sentences)
        return Prompt(sentences[j], {"caption": j, "unique_captions": len(sentences)})


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _unique(items: list[str]) -> list[str]:
    """Order-preserving de-duplication, ignoring case and a trailing full stop."""
    seen, out = set(), []
    for t in items:
        key = t.lower().rstrip(".")
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out
