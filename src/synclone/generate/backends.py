"""Generator backends, one registry: ``diffusers`` (text-to-image), ``img2img`` (real guidance), ``image_variation``
(image-conditioned), ``classcond``.

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
from pydantic import Field, field_validator

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

    supports_lora: ClassVar[bool] = False

    def __init__(self, cfg: GeneratorConfig, device: str = "cpu"):
        self.cfg = cfg
        self.options = backend_options(cfg)
        self.device = device
        if cfg.lora is not None and not self.supports_lora:
            raise UserError(f"generator.lora is for diffusers pipelines; backend '{cfg.backend}' cannot load it")

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
    supports_lora = True

    def __init__(self, cfg, device="cpu"):
        super().__init__(cfg, device)
        self.model = resolve_model(cfg.model, cfg.revision, marker="model_index.json", what="generator model",
                                   local_files_only=cfg.local_files_only)
        self.pipe = None
        if cfg.lora is not None:
            from synclone.generate.lora import adapter_fingerprint, check_adapter_base

            self.lora_sha = adapter_fingerprint(cfg.lora)  # refuses missing or pickled adapters
            check_adapter_base(cfg.lora, self.model.source, self.model.revision)

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

    def check_labels(self, label_space: LabelSpace) -> None:
        if self.cfg.lora is not None:
            self.class_adapters = _class_adapter_folders(self.cfg.lora, label_space)

    def load(self) -> None:
        pipe = self._from_pretrained()
        if self.cfg.scheduler:
            _swap_scheduler(pipe, self.cfg.scheduler, self.options.scheduler_options)
        if self.cfg.lora is not None:
            from synclone.generate.lora import load_lora

            per_class = getattr(self, "class_adapters", None) or {}
            for label, folder in per_class.items():  # one named adapter per class, switched per call
                load_lora(pipe, folder, self.cfg.lora_scale, name=f"class_{label}")
            if not per_class:
                load_lora(pipe, self.cfg.lora, self.cfg.lora_scale)
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
        per_class = getattr(self, "class_adapters", None)
        if not per_class:
            return self._call(jobs, generators)
        return self._per_class_calls(jobs, generators, lambda part, gens: self._call(part, gens))

    def _per_class_calls(self, jobs, generators, call) -> list[Generated]:
        """One ``call(jobs, generators)`` per class with that class's adapter active, each padded to the full batch
        like img2img's strength groups (see DiffusersImg2Img.generate)."""
        import torch

        out: list[Generated | None] = [None] * len(jobs)
        for label in sorted({j.label for j in jobs}):
            self.pipe.set_adapters([f"class_{label}"], adapter_weights=[float(self.cfg.lora_scale)])
            pos = [i for i, j in enumerate(jobs) if j.label == label]
            pad = len(jobs) - len(pos)
            last = generators[pos[-1]]
            part = [jobs[i] for i in pos] + [jobs[pos[-1]]] * pad
            gens = [generators[i] for i in pos] + [
                torch.Generator(device=last.device).manual_seed(last.initial_seed()) for _ in range(pad)]
            for i, g in zip(pos, call(part, gens), strict=False):
                out[i] = g
        return out

    def describe(self) -> dict:
        lora = ({"lora": {"folder": self.cfg.lora, "sha256": self.lora_sha, "scale": self.cfg.lora_scale}}
                if self.cfg.lora is not None else {})
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
            **lora,
        }


def reference_files(root: Path, label_space: LabelSpace) -> dict[int, list[str]]:
    """Real reference images per class (paths relative to ``root``): ``root/<slug or class name>/*``; every class
    needs at least one."""
    out: dict[int, list[str]] = {}
    missing = []
    for label, (name, slug) in enumerate(zip(label_space.classes, label_space.slugs, strict=True)):
        folders = [root / slug]
        if "/" not in name and "\\" not in name and name not in (".", ".."):
            folders.append(root / name)
        folder = next((f for f in folders if f.is_dir()), None)
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS) if folder else []
        if not files:
            missing.append(name)
            continue
        out[label] = [p.relative_to(root).as_posix() for p in files]
    if missing:
        shown = ", ".join(f"'{m}'" for m in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise UserError(
            f"reference folder '{root}' has no images for {len(missing)} classes ({shown}): add a "
            f"sub-folder named by the class's slug with at least one image each"
        )
    return out


def _class_adapter_folders(lora: str, label_space: LabelSpace) -> dict[int, Path]:
    """Label -> its class's adapter folder for a per-class adapter folder (every class needs one); ``{}`` for a
    single adapter."""
    from synclone.generate.lora import per_class_adapters

    classes = per_class_adapters(lora)
    if classes is None:
        return {}
    by_slug = {Path(f).name: f for f in classes.values()}
    out, missing = {}, []
    for label, (name, slug) in enumerate(zip(label_space.classes, label_space.slugs, strict=True)):
        folder = classes.get(name) or by_slug.get(slug)
        if folder is None:
            missing.append(name)
        else:
            out[label] = folder
    if missing:
        raise UserError(f"per-class LoRA adapter '{lora}' has no adapter for class(es) "
                        f"{', '.join(map(repr, missing[:5]))}: train it on those classes too, or leave them out")
    return out


class Img2ImgOptions(DiffusersOptions):
    references: str  # folder with one sub-folder of real images per class (named by slug or class name)
    strength: float = Field(default=0.75, gt=0, le=1)  # SDEdit noise level: 1 ignores the reference
    # He et al.'s rule, fewer shots -> more noise: {shots: strength}; a class with k reference images gets the
    # entry of the largest key <= k (below the smallest key, the smallest key's). Replaces ``strength``.
    strength_by_shots: dict[int, float] | None = None

    @field_validator("strength_by_shots")
    @classmethod
    def _check_table(cls, table: dict[int, float] | None) -> dict[int, float] | None:
        return check_strength_table(table)


def load_reference(root: Path, rel: str | None, width: int | None, height: int | None, backend: str) -> Image.Image:
    """Reference image ``rel`` of folder ``root`` as RGB, fitted to ``width`` x ``height`` (bicubic, centre crop)."""
    if rel is None:
        raise UserError(f"an {backend} job has no reference image; rebuild the plan with references")
    path = (root / rel).resolve()
    if not path.is_relative_to(root.resolve()):
        raise UserError(f"reference '{rel}' points outside the reference folder '{root}'")
    with open_image(path) as im:
        im = im.convert("RGB")
        if height and width:
            from PIL import ImageOps

            im = ImageOps.fit(im, (width, height), method=Image.Resampling.BICUBIC)
        return im


def check_strength_table(table: dict[int, float] | None) -> dict[int, float] | None:
    """A ``{shots: strength}`` table sorted by shots; ``ValueError`` (a config error) when an entry is invalid."""
    if table is None:
        return None
    if not table:
        raise ValueError("strength_by_shots is empty: give {shots: strength} pairs or leave it out")
    bad = [k for k, v in table.items() if k < 1 or not 0 < v <= 1]
    if bad:
        raise ValueError(f"strength_by_shots needs shots >= 1 and strengths in (0, 1]; see the entry {bad[0]}")
    return dict(sorted(table.items()))


def strength_for_shots(table: dict[int, float], shots: int) -> float:
    """The img2img strength of a class with ``shots`` real references: the entry of the largest key <= shots,
    or of the smallest key when there are fewer shots than every key."""
    keys = sorted(table)
    below = [k for k in keys if k <= shots]
    return float(table[below[-1] if below else keys[0]])


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

    def check_labels(self, label_space: LabelSpace) -> None:
        super().check_labels(label_space)
        if getattr(self, "class_adapters", None):
            raise UserError("per-class LoRA adapters are for backends diffusers and classcond; img2img takes one "
                            "adapter for every class")

    def references(self, label_space: LabelSpace) -> dict[int, list[str]]:
        out = self._references(label_space)
        table = self.options.strength_by_shots
        self.class_strength = {label: (strength_for_shots(table, len(refs)) if table else self.options.strength)
                               for label, refs in out.items()}
        self.class_names = label_space.classes
        return out

    def _references(self, label_space: LabelSpace) -> dict[int, list[str]]:
        return reference_files(self.root, label_space)

    def load(self) -> None:
        super().load()
        strengths = set(getattr(self, "class_strength", {}).values()) or {self.options.strength}
        low = min(strengths)
        if int(self.steps * low) < 1:
            raise UserError(f"img2img strength {low} x {self.steps} steps runs no denoising step: raise "
                            "generator.steps or the strength")

    def _reference(self, rel: str | None) -> Image.Image:
        return load_reference(self.root, rel, self.width, self.height, self.name)

    def generate(self, jobs, generators):
        if not self.options.strength_by_shots:
            images = [self._reference(j.reference) for j in jobs]
            return self._call(jobs, generators, image=images, strength=self.options.strength)
        # One pipeline call per strength, each padded to the full batch (copies of its last job with their own
        # fresh generators, outputs dropped) like the runner's batches: CPU kernels can round differently for
        # another batch size, and every image keeps its own generator, so an image does not depend on its batch.
        import torch

        out: list[Generated | None] = [None] * len(jobs)
        for strength in sorted({self.class_strength[j.label] for j in jobs}):
            pos = [i for i, j in enumerate(jobs) if self.class_strength[j.label] == strength]
            part = [jobs[i] for i in pos]
            gens = [generators[i] for i in pos]
            last = gens[-1]
            pad = len(jobs) - len(part)
            part += [part[-1]] * pad
            gens += [torch.Generator(device=last.device).manual_seed(last.initial_seed()) for _ in range(pad)]
            made = self._call(part, gens, image=[self._reference(j.reference) for j in part], strength=strength)
            for i, g in zip(pos, made, strict=False):
                out[i] = g
        return out

    def describe(self) -> dict:
        info = {**super().describe(), "references": str(self.root), "strength": self.options.strength}
        if self.options.strength_by_shots is None:  # datasets made before the table keep their record
            info["options"].pop("strength_by_shots", None)
        else:
            info["options"]["strength_by_shots"] = {str(k): v for k, v in self.options.strength_by_shots.items()}
            info["strength_by_class"] = {self.class_names[c]: s for c, s in sorted(self.class_strength.items())}
        return info


class ImageVariationOptions(DiffusersOptions):
    references: str  # folder with one sub-folder of real images per class (named by slug or class name)


@register_backend
class DiffusersImageVariation(DiffusersText2Image):
    """Image-conditioned generation (Bansal & Grover's RQ2): each image is a variation of a real reference image of
    its class, taken in turn like img2img's (``StableDiffusionImageVariationPipeline``: the reference's CLIP image
    embedding conditions the UNet instead of a prompt; the plan's prompts are recorded but not used). The
    reference of every image is in its metadata row."""

    name = "image_variation"
    Options = ImageVariationOptions
    auto_class = "DiffusionPipeline"  # AutoPipeline maps no image-variation class: load what model_index.json names
    supports_lora = False

    def __init__(self, cfg, device="cpu"):
        super().__init__(cfg, device)
        self.root = Path(self.options.references)
        if not self.root.is_dir():
            raise UserError(f"reference folder '{self.root}' does not exist (generator.options.references)")

    def references(self, label_space: LabelSpace) -> dict[int, list[str]]:
        return reference_files(self.root, label_space)

    def load(self) -> None:
        super().load()
        if getattr(self.pipe, "image_encoder", None) is None:
            raise UserError(f"generator model '{self.model.source}' ({type(self.pipe).__name__}) has no image "
                            "encoder: backend image_variation needs an image-variation pipeline (e.g. "
                            "lambdalabs/sd-image-variations-diffusers)")

    def generate(self, jobs, generators):
        kwargs: dict[str, Any] = dict(
            image=[load_reference(self.root, j.reference, self.width, self.height, self.name) for j in jobs],
            generator=generators, num_inference_steps=self.steps, guidance_scale=self.guidance_scale,
            output_type="np", **self.options.call_options)
        if self.height and self.width:
            kwargs.update(height=self.height, width=self.width)
        out = self.pipe(**kwargs)
        flags = getattr(out, "nsfw_content_detected", None) or [False] * len(jobs)
        return [Generated(None, SAFETY_REASON) if bad else Generated(img)
                for img, bad in zip(_to_pil(out.images), flags, strict=True)]

    def describe(self) -> dict:
        return {**super().describe(), "references": str(self.root)}


class ClassCondOptions(StrictModel):
    """Real guidance for the built-in generator (SDEdit-style), off unless ``references`` is set."""
    references: str | None = None  # folder with one sub-folder of real images per class (slug or class name)
    strength: float = Field(default=0.75, gt=0, le=1)
    strength_by_shots: dict[int, float] | None = None  # as img2img's: {shots: strength}, replaces ``strength``

    @field_validator("strength_by_shots")
    @classmethod
    def _check_table(cls, table: dict[int, float] | None) -> dict[int, float] | None:
        return check_strength_table(table)


@register_backend
class ClassConditional(Backend):
    """synclone's class-conditional pixel-space generator (``synclone generator train``); no prompts needed.

    With ``options.references`` each image starts from a real image of its class noised to ``strength`` (or the
    ``strength_by_shots`` entry of its class's reference count) and is denoised with its class label.
    """

    name = "classcond"
    Options = ClassCondOptions
    supports_lora = True

    def __init__(self, cfg, device="cpu"):
        super().__init__(cfg, device)
        self.model = resolve_model(cfg.model, None, marker="model_index.json", what="class-conditional generator")
        if not self.model.local_folder:
            raise UserError(f"class-conditional generator '{cfg.model}' must be a local folder")
        self.pipe = None
        self.to_generator_label: list[int] = []
        # label -> the pipeline of its class's adapter (per-class adapters); other labels use self.pipe
        self.class_pipes: dict[int, Any] = {}
        if cfg.lora is not None:
            from synclone.generate.lora import adapter_fingerprint

            self.lora_sha = adapter_fingerprint(cfg.lora)  # refuses missing or pickled adapters
            self._pipeline()  # checks the adapter's base model and merges it

    def _pipeline(self):
        if self.pipe is None:
            from synclone.generate.classcond import load_classcond_pipeline

            pipe = load_classcond_pipeline(self.model.location, device="cpu")
            if self.cfg.scheduler:
                _swap_scheduler(pipe, self.cfg.scheduler, {})
            if self.cfg.lora is not None:
                from synclone.generate.lora import check_adapter_base, merge_lora_into_unet, per_class_adapters

                check_adapter_base(self.cfg.lora, self.model.source, pipe.revision)
                if per_class_adapters(self.cfg.lora) is None:  # one adapter for every class: merged once
                    merge_lora_into_unet(pipe.unet, self.cfg.lora, self.cfg.lora_scale)
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
        if self.cfg.lora is not None:
            self.class_adapters = _class_adapter_folders(self.cfg.lora, label_space)

    def load(self) -> None:
        pipe = self._pipeline()
        if self.cfg.lora is not None and getattr(self, "class_adapters", None) and not self.class_pipes:
            import copy

            from synclone.generate.lora import merge_lora_into_unet

            for label, folder in self.class_adapters.items():  # one merged copy of the small UNet per class
                p = copy.deepcopy(pipe)
                merge_lora_into_unet(p.unet, folder, self.cfg.lora_scale)
                self.class_pipes[label] = p
        self.steps = int(self.cfg.steps or pipe.defaults["num_inference_steps"])
        gs = self.cfg.guidance_scale
        self.guidance_scale = float(pipe.defaults["guidance_scale"] if gs is None else gs)

    def references(self, label_space: LabelSpace) -> dict[int, list[str]] | None:
        if self.options.references is None:
            return None
        self.root = Path(self.options.references)
        if not self.root.is_dir():
            raise UserError(f"reference folder '{self.root}' does not exist (generator.options.references)")
        out = reference_files(self.root, label_space)
        table = self.options.strength_by_shots
        self.class_strength = {label: (strength_for_shots(table, len(refs)) if table else self.options.strength)
                               for label, refs in out.items()}
        self.class_names = label_space.classes
        return out

    def _reference_pixels(self, rel: str | None):
        """A reference image as uint8 (C, H, W) at the generator's size and channel count."""
        import torch
        from PIL import ImageOps

        if rel is None:
            raise UserError("a guided job has no reference image; rebuild the plan with references")
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise UserError(f"reference '{rel}' points outside the reference folder '{self.root}'")
        pre = self.pipe.preprocessing
        h, w = pre["image_size"]
        with Image.open(path) as im:
            im = ImageOps.fit(im.convert("L" if pre["channels"] == 1 else "RGB"), (w, h),
                              method=Image.Resampling.BICUBIC)
            arr = np.asarray(im, dtype=np.uint8)
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        return torch.from_numpy(arr.copy())

    def generate(self, jobs, generators):
        import torch

        labels = [self.to_generator_label[j.label] for j in jobs]
        guided = self.options.references is not None

        def group(j):  # which pipeline (a per-class adapter's or the shared one) and which strength
            return (j.label if j.label in self.class_pipes else -1, self.class_strength[j.label] if guided else 1.0)

        # One call per (pipeline, strength), each padded to the full batch like img2img's (see
        # DiffusersImg2Img.generate); a batch with one group is one call, as it always was.
        out: list[Generated | None] = [None] * len(jobs)
        for key in sorted({group(j) for j in jobs}):
            pos = [i for i, j in enumerate(jobs) if group(j) == key]
            pad = len(jobs) - len(pos)
            last = generators[pos[-1]]
            gens = [generators[i] for i in pos] + [
                torch.Generator(device=last.device).manual_seed(last.initial_seed()) for _ in range(pad)]
            idx = pos + [pos[-1]] * pad
            pipe = self.class_pipes.get(key[0], self.pipe)
            extra = {}
            if guided:
                extra = dict(image=torch.stack([self._reference_pixels(jobs[i].reference) for i in idx]),
                             strength=key[1])
            images = pipe(class_labels=[labels[i] for i in idx], generator=gens, num_inference_steps=self.steps,
                          guidance_scale=self.guidance_scale, **extra)
            for i, im in zip(pos, images, strict=False):
                out[i] = Generated(im)
        return out

    def describe(self) -> dict:
        size = self.pipe.preprocessing.get("image_size") or [None, None]
        info = {
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
        if self.cfg.lora is not None:  # datasets made without an adapter keep the record they always had
            info["lora"] = {"folder": self.cfg.lora, "sha256": self.lora_sha, "scale": self.cfg.lora_scale}
        if self.options.references is not None:  # unguided datasets keep the record they always had
            info["options"] = self.options.model_dump(mode="json")
            if self.options.strength_by_shots is not None:  # JSON keys are strings: record them so for resume
                info["options"]["strength_by_shots"] = {str(k): v for k, v in self.options.strength_by_shots.items()}
            info["references"] = str(self.root)
            info["strength_by_class"] = {self.class_names[c]: v for c, v in sorted(self.class_strength.items())}
        return info
