"""The ``synclone generate`` config: label space, prompts, generator, counts, seed, batch and output.

Example (YAML)::

    labels: fashion_mnist              # a built-in space, a .json/.txt file, or a list of names
    prompts:
      strategy: clip_templates         # classname | clip_templates | diverse | captions | contexts | file
      negative_prompt: "blurry, text"
      options: {mode: random}
    generator:
      backend: diffusers               # diffusers | img2img | image_variation | classcond
      model: stabilityai/sd-turbo      # hub id or local folder
      scheduler: DPMSolverMultistepScheduler
      steps: 20
      guidance_scale: 7.5
      height: 512
      width: 512
      # lora: runs/finetune           # a LoRA adapter (synclone generator finetune): diffusers, img2img, classcond
      # lora_scale: 0.8
    images_per_class: 100
    seed: 0
    batch_size: 8
    output: runs/my_clone
    # extend: {Dress: {start: 100, count: 20}}   # a top-up: only images 100..119 of Dress (fresh ids)
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Literal

from pydantic import Field, model_validator

from synclone.config import StrictModel
from synclone.generate.backends import backend_options
from synclone.prompts import PromptConfig
from synclone.util.executor import ExecutorConfig


class GeneratorConfig(StrictModel):
    """The ``generator`` section. ``steps``/``guidance_scale`` default to the model's own defaults.

    ``options`` are backend-specific and checked against the backend's options model (e.g. img2img:
    ``references`` folder and ``strength``).
    """
    backend: str = "diffusers"
    model: str | None = None
    revision: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = "auto"
    scheduler: str | None = None
    # Upper bounds: past them a run would never finish or could not allocate its batch (checked before any file).
    steps: int | None = Field(default=None, ge=1, le=10_000)
    guidance_scale: float | None = Field(default=None, ge=0)
    height: int | None = Field(default=None, ge=8, le=16_384)
    width: int | None = Field(default=None, ge=8, le=16_384)
    safety_retries: int = Field(default=3, ge=0)
    local_files_only: bool | None = None  # None: follow HF_HUB_OFFLINE
    # A LoRA adapter folder (synclone generator finetune, or diffusers' LoRA format) and its weight; 0 = base model.
    lora: str | None = None
    lora_scale: float = Field(default=1.0, ge=0)
    options: dict[str, Any] = {}

    @model_validator(mode="after")
    def _check_options(self) -> GeneratorConfig:
        backend_options(self)
        return self


class ImageRange(StrictModel):
    """Images ``start .. start + count - 1`` of one class; image ``k`` of class ``label`` has id ``k * C + label``."""
    start: int = Field(ge=0)
    count: int = Field(ge=0)


class GenerateConfig(StrictModel):
    """Everything that determines a generated dataset (``output`` only says where it goes)."""
    labels: str | list[str] | None = None  # None: the generator's own label space (classcond)
    prompts: PromptConfig = PromptConfig()
    generator: GeneratorConfig = GeneratorConfig()
    images_per_class: int = Field(default=100, ge=1, le=1_000_000)
    seed: int = 0
    batch_size: int = Field(default=8, ge=1, le=4096)
    output: str = "runs/generated"
    # How resume checks images already made: "size" (fast) or "sha256" (reads every file).
    resume_verify: Literal["size", "sha256"] = "size"
    progress: bool = True
    # Where the images are made: this process (local) or a Ray cluster; see synclone.util.executor.
    executor: ExecutorConfig = ExecutorConfig()
    # A top-up (``synclone curate`` with ``refill`` writes these): per class name, make only images
    # start .. start+count-1, with the ids, seeds and prompts they would have in a larger plan, instead of
    # images 0 .. images_per_class-1 of every class. images_per_class still sizes the prompt pools (captions),
    # so keep the source dataset's value. Start at the source's images_per_class and no id is reused.
    extend: dict[str, ImageRange] | None = None

    @model_validator(mode="after")
    def _check_batch_memory(self) -> GenerateConfig:
        # A batch's decoded images alone (float32 RGB, with a few working copies) must fit in this machine's
        # memory; past that the run dies in the allocator after its plan is written.
        h, w = self.generator.height or 512, self.generator.width or 512
        need = self.batch_size * h * w * 3 * 4 * 4
        try:
            have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return self
        if need > have:
            raise ValueError(f"a batch of {self.batch_size} images of {h}x{w} needs ~{need / 2**30:.1f} GB of memory, "
                             f"more than this machine's {have / 2**30:.1f} GB; lower batch_size")
        return self

    def fingerprint(self) -> str:
        """A hash of every setting that shapes the dataset; resuming requires the same fingerprint."""
        # The executor never changes the bytes, so a dataset started locally can be finished on Ray and back.
        # ``extend`` only enters when set, so datasets made before it existed keep their fingerprint.
        skip = {"output", "resume_verify", "progress", "executor"} | ({"extend"} if self.extend is None else set())
        data = self.model_dump(mode="json", exclude=skip)
        if self.generator.lora is None:  # datasets made before adapters existed keep their fingerprint
            for key in ("lora", "lora_scale"):
                data["generator"].pop(key)
        else:  # the adapter's weights, not only its folder name, shape the dataset
            from synclone.generate.lora import adapter_fingerprint

            data["generator"]["lora_sha256"] = adapter_fingerprint(self.generator.lora)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode("utf-8")).hexdigest()[:16]
