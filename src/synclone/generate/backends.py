"""Generator backends, one registry: ``diffusers`` (text-to-image), ``img2img`` (real guidance), ``classcond``.

Every backend takes a batch of jobs and one ``torch.Generator`` per job (seeded with the job's seed)
and returns one :class:`Generated` per job: an image, or ``None`` with the reason (e.g. the safety
checker flagged it). Constructing a backend is cheap and validates the config (an unknown model
offline is a :class:`UserError` here, before any image); :meth:`Backend.load` does the heavy work.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from PIL import Image
from pydantic import Field

from synclone.config import StrictModel, validate
from synclone.data.images import IMAGE_EXTENSIONS, open_image
from synclone.errors import UserError
from synclone.labels import LabelSpace
from synclone.models.hub import resolve_model

if TYPE_CHECKING:
    import torch

    from synclone.generate.config import GeneratorConfig
    from synclone.generate.plan import Job

SAFETY_REASON = "flagged by the pipeline's safety checker"


@dataclass
class Generated:
    """One backend output: an image, or ``None`` and why (never a blacked-out image)."""

    image: Image.Image | None
    reason: str | None = None


class NoOptions(StrictModel):
    """A backend without options."""


class Backend:
    """Base class: subclasses set ``name``/``Options`` and implement :meth:`load` and :meth:`generate`."""

    name: ClassVar[str]
    Options: ClassVar[type[StrictModel]] = NoOptions

    def __init__(self, cfg: GeneratorConfig, device: str = "cpu"):
        self.cfg = cfg
        self.options = backend_options(cfg)
        self.device = device

    def label_space(self) -> LabelSpace | None:
        """The generator's own label space, if it has one (class-conditional models)."""
        return None

    def check_labels(self, label_space: LabelSpace) -> None:
        """Raise :class:`UserError` if the generator can't make these classes."""

    def references(self, label_space: LabelSpace) -> dict[int, list[str]] | None:
        """Real reference images per class (paths relative to the references folder), for real guidance."""
        return None

    def load(self) -> None:
        raise NotImplementedError

    def generate(self, jobs: list[Job], generators: list[torch.Generator]) -> list[Generated]:
        raise NotImplementedError

    def describe(self) -> dict:
        """What the dataset records about the generator (after :meth:`load`)."""
        raise NotImplementedError


BACKENDS: dict[str, type[Backend]] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator adding a backend to the registry under ``cls.name``."""
    BACKENDS[cls.name] = cls
    return cls


def list_backends() -> list[str]:
    return sorted(BACKENDS)


def _backend_class(name: str) -> type[Backend]:
    try:
        return BACKENDS[name]
    except KeyError:
        raise UserError(f"unknown generator backend '{name}': use one of {', '.join(list_backends())}") from None


def backend_options(cfg: GeneratorConfig) -> StrictModel:
    """``cfg.options`` validated into the backend's options model."""
    cls = _backend_class(cfg.backend)
    return validate(cls.Options, dict(cfg.options), source=f"generator.options (backend '{cfg.backend}')")


def create_backend(cfg: GeneratorConfig, device: str = "cpu") -> Backend:
    """The configured backend, validated but not loaded."""
    return _backend_class(cfg.backend)(cfg, device)


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _dtype_kwarg() -> str:
    """diffusers renamed ``torch_dtype`` to ``dtype`` (and warns about the old name)."""
    try:
        from diffusers.utils import deprecation_utils

        return "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"
    except ImportError:
        return "torch_dtype"


def _swap_scheduler(pipe, name: str, options: dict) -> None:
    """Replace ``pipe.scheduler`` by the diffusers scheduler class ``name`` on the same noise schedule."""
    import diffusers
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    cls = getattr(diffusers, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, SchedulerMixin)):
        known = sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and n != "SchedulerMixin")
        raise UserError(f"unknown scheduler '{name}': use a diffusers scheduler class such as {', '.join(known[:8])}")
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **options)


def _call_default(pipe, arg: str, fallback):
    p = inspect.signature(type(pipe).__call__).parameters.get(arg)
    return p.default if p is not None and p.default is not inspect.Parameter.empty else fallback


def _to_pil(images) -> list[Image.Image]:
    """Float images in [0, 1] (N, H, W, C) -> PIL, rounding as diffusers' ``numpy_to_pil`` does."""
    arr = (np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8)
    if arr.shape[-1] == 1:
        return [Image.fromarray(a[..., 0], mode="L") for a in arr]
    return [Image.fromarray(a) for a in arr]


class DiffusersOptions(StrictModel):
    variant: str | None = None  # weight file variant, e.g. "fp16"
    scheduler_options: dict[str, Any] = {}  # passed to the scheduler's from_config
    call_options: dict[str, Any] = {}  # extra keyword arguments for every pipeline call (e.g. eta)


@register_backend
class DiffusersText2Image(Backend):
    """Any diffusers text-to-image pipeline by hub id or local folder (``AutoPipelineForText2Image``)."""

    name = "diffusers"
    Options = DiffusersOptions
    auto_class = "AutoPipelineForText2Image"

    def __init__(self, cfg, device="cpu"):
        super().__init__(cfg, device)
        self.model = resolve_model(cfg.model, cfg.revision, marker="model_index.json", what="generator model",
                                   local_files_only=cfg.local_files_only)
        self.pipe = None

    def _from_pretrained(self):
        import diffusers

        dtype_kwarg = _dtype_kwarg()
        kw = {dtype_kwarg: _torch_dtype(self.cfg.dtype), "local_files_only": self.model.local_files_only}
        if not self.model.local_folder:
            kw["revision"] = self.model.revision  # pin the commit that was resolved
        if self.options.variant:
            kw["variant"] = self.options.variant
        try:
            return getattr(diffusers, self.auto_class).from_pretrained(self.model.location, **kw)
        except ValueError as err:
            if "AutoPipeline can't find" not in str(err):
                raise
            if self.auto_class != "AutoPipelineForText2Image":
                raise UserError(f"generator model '{self.model.source}' has no image-to-image pipeline") from None
            # A pipeline class AutoPipeline doesn't map: load it as what model_index.json names.
            return diffusers.DiffusionPipeline.from_pretrained(self.model.location, **kw)

    def load(self) -> None:
        pipe = self._from_pretrained()
        if self.cfg.scheduler:
            _swap_scheduler(pipe, self.cfg.scheduler, self.options.scheduler_options)
        pipe = pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.steps = self.cfg.steps or int(_call_default(pipe, "num_inference_steps", 50))
        self.guidance_scale = float(
            self.cfg.guidance_scale if self.cfg.guidance_scale is not None
            else _call_default(pipe, "guidance_scale", 7.5)
        )
        default = self._default_size()
        self.height = self.cfg.height or default
        self.width = self.cfg.width or default

    def _default_size(self) -> int | None:
        """Pixel size the pipeline makes by default: the denoiser's sample size times the VAE's scale."""
        scale = getattr(self.pipe, "vae_scale_factor", None)
        for attr in ("unet", "transformer"):
            net = getattr(self.pipe, attr, None)
            size = getattr(getattr(net, "config", None), "sample_size", None)
            if scale and isinstance(size, int):
                return int(size * scale)
        return None

    def _call(self, jobs: list[Job], generators: list, **extra) -> list[Generated]:
        kwargs: dict[str, Any] = dict(
            prompt=[j.prompt for j in jobs],
            generator=generators,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance_scale,
            output_type="np",
            **self.options.call_options,
            **extra,
        )
        if self.height and self.width:
            kwargs.update(height=self.height, width=self.width)
        if any(j.negative_prompt for j in jobs):
            kwargs["negative_prompt"] = [j.negative_prompt or "" for j in jobs]
        out = self.pipe(**kwargs)
        flags = getattr(out, "nsfw_content_detected", None) or [False] * len(jobs)
        return [Generated(None, SAFETY_REASON) if bad else Generated(img)
                for img, bad in zip(_to_pil(out.images), flags, strict=True)]

    def generate(self, jobs, generators):
        return self._call(jobs, generators)

    def describe(self) -> dict:
        return {
            "backend": self.name,
            "generator": self.model.source,
            "generator_revision": self.model.revision,
            "pipeline": type(self.pipe).__name__,
            "scheduler": type(self.pipe.scheduler).__name__,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "dtype": self.cfg.dtype,
            "height": self.height,
            "width": self.width,
            "options": self.options.model_dump(mode="json"),
        }


class Img2ImgOptions(DiffusersOptions):
    references: str  # folder with one sub-folder of real images per class (named by slug or class name)
    strength: float = Field(default=0.75, gt=0, le=1)  # SDEdit noise level: 1 ignores the reference


@register_backend
class DiffusersImg2Img(DiffusersText2Image):
    """Real guidance (SDEdit-style): each image starts from a real reference image of its class, noised."""

    name = "img2img"
    Options = Img2ImgOptions
    auto_class = "AutoPipelineForImage2Image"

    def __init__(self, cfg, device="cpu"):
        super().__init__(cfg, device)
        self.root = Path(self.options.references)
        if not self.root.is_dir():
            raise UserError(f"reference folder '{self.root}' does not exist (generator.options.references)")

    def references(self, label_space: LabelSpace) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        missing = []
        for label, (name, slug) in enumerate(zip(label_space.classes, label_space.slugs, strict=True)):
            folders = [self.root / slug]
            if "/" not in name and "\\" not in name and name not in (".", ".."):
                folders.append(self.root / name)
            folder = next((f for f in folders if f.is_dir()), None)
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS) if folder else []
            if not files:
                missing.append(name)
                continue
            out[label] = [p.relative_to(self.root).as_posix() for p in files]
        if missing:
            shown = ", ".join(f"'{m}'" for m in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise UserError(
                f"reference folder '{self.root}' has no images for {len(missing)} classes ({shown}): add a "
                f"sub-folder named by the class's slug with at least one image each"
            )
        return out

    def _reference(self, rel: str | None) -> Image.Image:
        if rel is None:
            raise UserError("an img2img job has no reference image; rebuild the plan with references")
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise UserError(f"reference '{rel}' points outside the reference folder '{self.root}'")
        with open_image(path) as im:
            im = im.convert("RGB")
            if self.height and self.width:
                from PIL import ImageOps

                im = ImageOps.fit(im, (self.width, self.height), method=Image.Resampling.BICUBIC)
            return im

    def generate(self, jobs, generators):
        images = [self._reference(j.reference) for j in jobs]
        return self._call(jobs, generators, image=images, strength=self.options.strength)

    def describe(self) -> dict:
        return {**super().describe(), "references": str(self.root), "strength": self.options.strength}


@register_backend
class ClassConditional(Backend):
    """synclone's class-conditional pixel-space generator (``synclone generator train``); no prompts needed."""

    name = "classcond"

    def __init__(self, cfg, device="cpu"):
        super().__init__(cfg, device)
        self.model = resolve_model(cfg.model, None, marker="model_index.json", what="class-conditional generator")
        if not self.model.local_folder:
            raise UserError(f"class-conditional generator '{cfg.model}' must be a local folder")
        self.pipe = None
        self.to_generator_label: list[int] = []

    def _pipeline(self):
        if self.pipe is None:
            from synclone.generate.classcond import load_classcond_pipeline

            pipe = load_classcond_pipeline(self.model.location, device="cpu")
            if self.cfg.scheduler:
                _swap_scheduler(pipe, self.cfg.scheduler, {})
            if self.cfg.dtype != "float32":
                pipe.unet.to(_torch_dtype(self.cfg.dtype))
            self.pipe = pipe.to(self.device)
        return self.pipe

    def label_space(self) -> LabelSpace:
        return self._pipeline().label_space

    def check_labels(self, label_space: LabelSpace) -> None:
        own = self.label_space()
        missing = [c for c in label_space.classes if c not in own.classes]
        if missing:
            raise UserError(
                f"class-conditional generator '{self.model.source}' cannot make {', '.join(map(repr, missing[:5]))}: "
                f"it knows {own.describe()}"
            )
        self.to_generator_label = [own.classes.index(c) for c in label_space.classes]

    def load(self) -> None:
        pipe = self._pipeline()
        self.steps = int(self.cfg.steps or pipe.defaults["num_inference_steps"])
        gs = self.cfg.guidance_scale
        self.guidance_scale = float(pipe.defaults["guidance_scale"] if gs is None else gs)

    def generate(self, jobs, generators):
        labels = [self.to_generator_label[j.label] for j in jobs]
        images = self.pipe(class_labels=labels, generator=generators, num_inference_steps=self.steps,
                           guidance_scale=self.guidance_scale)
        return [Generated(im) for im in images]

    def describe(self) -> dict:
        size = self.pipe.preprocessing.get("image_size") or [None, None]
        return {
            "backend": self.name,
            "generator": self.model.source,
            "generator_revision": self.pipe.revision,
            "pipeline": type(self.pipe).__name__,
            "scheduler": type(self.pipe.scheduler).__name__,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "dtype": self.cfg.dtype,
            "height": size[0],
            "width": size[1],
            "options": {},
        }
