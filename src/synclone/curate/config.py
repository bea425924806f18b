"""``CurateConfig``: what ``synclone curate CONFIG [key=value ...]`` reads.

Filters are named sections rather than a list so that every knob has a dotted path for command-line
overrides (``filters.threshold.p_label=0.6``); ``filters.order`` says in which order the enabled ones run.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_serializer

from synclone.config import StrictModel
from synclone.data.readable import max_unreadable_field
from synclone.util.executor import ExecutorConfig

FILTER_NAMES = ("degenerate", "threshold", "quantile", "real_centroid", "dedup", "he", "keep_k")
# Scores a filter can rank or threshold on, with their ranges (probabilities, differences of them, cosines).
SCORE_RANGES = {"p_label": (0.0, 1.0), "margin": (-1.0, 1.0), "class_sim": (-1.0, 1.0), "prompt_sim": (-1.0, 1.0)}
Score = Literal["p_label", "margin", "class_sim", "prompt_sim"]


class ScorerConfig(StrictModel):
    """Which model scores the images.

    - ``openclip``: ``model`` is an open_clip name (``ViT-B-32``, with ``pretrained`` a tag or a checkpoint
      file), ``local-dir:PATH`` or a folder holding ``open_clip_config.json`` + weights, or a model-config
      ``.json`` file (with ``pretrained`` a checkpoint file).
    - ``hf_clip``: ``model`` is a transformers CLIP folder (``save_pretrained`` layout) or a hub id that is
      already in the local Hugging Face cache.
    - ``teacher``: ``model`` is a synclone model folder (``model.safetensors`` + ``config.json``).
    """

    kind: Literal["openclip", "hf_clip", "teacher"] = "openclip"
    model: str = "ViT-B-32"
    pretrained: str | None = "openai"
    # CLIP only: prompt templates, "openai" (OpenAI's 80 ImageNet templates), "simple" (their 7-template
    # subset), both from open_clip.zero_shot_metadata, or a list of strings with "{c}" for the class name.
    templates: Literal["openai", "simple"] | list[str] = "openai"
    # CLIP only: score over this label space (a built-in name or a .json/.txt file) instead of the dataset's
    # classes, e.g. to add distractor classes; every dataset class must be in it.
    label_space: str | None = None
    # Softmax over the dataset's classes only (True), or over all classes of the scorer's label space.
    restrict_to_dataset: bool = True
    # CLIP only: logits = scale * cosine; None = the model's own learnt logit scale (100 for OpenAI CLIP).
    logit_scale: float | None = Field(None, gt=0)
    batch_size: int = Field(64, ge=1)
    device: str = "cpu"


class DegenerateFilter(StrictModel):
    """Drop images a generator got wrong as a whole: NaN pixels, (near-)black, or (near-)constant."""

    enabled: bool = True
    # All-black: the brightest pixel is at most this grey level (0..255); diffusers' safety checker writes 0s.
    black_max: float = Field(4.0, ge=0, le=255)
    # Constant: pixel standard deviation below this many grey levels.
    min_std: float = Field(0.5, ge=0, le=128)


class ThresholdFilter(StrictModel):
    """Keep an image only if each score set here is at least its minimum."""

    p_label: float | None = Field(None, ge=0.0, le=1.0)
    margin: float | None = Field(None, ge=-1.0, le=1.0)
    class_sim: float | None = Field(None, ge=-1.0, le=1.0)
    prompt_sim: float | None = Field(None, ge=-1.0, le=1.0)


class QuantileFilter(StrictModel):
    """Per class, drop the images whose ``score`` lies below that class's ``q``-quantile."""

    score: Score | None = None
    q: float = Field(0.1, ge=0.0, lt=1.0)


class DedupFilter(StrictModel):
    """Near-duplicates: within a class, an image whose embedding has cosine >= ``tau`` with a kept one is dropped.

    Greedy over a stable order: by ``prefer`` descending (the best copy survives), ties by image id.
    A teacher's embeddings are post-ReLU features (all non-negative), so their cosines run higher than
    CLIP's: a tau that suits CLIP (0.9-0.95) removes distinct images under a teacher; use 0.99 or more there.
    """

    enabled: bool = False
    tau: float = Field(0.95, gt=-1.0, le=1.0)
    prefer: Score | Literal["id"] = "p_label"


class HeFilter(StrictModel):
    """He et al. (2023): keep an image if p(label) > 1/C, then ``k`` per class of those above chance.

    ``select: top`` keeps the ``k`` with the highest p(label); ``random`` keeps ``k`` drawn at random (seeded
    by ``seed`` and each image's id, as the paper samples above the threshold).
    """

    enabled: bool = False
    k: int | None = Field(None, ge=1)
    select: Literal["top", "random"] = "top"
    seed: int = 0


class RealCentroidFilter(StrictModel):
    """He et al. (2023): keep a synthetic image when the nearest class centroid of the real shots, in the scorer's
    feature space (CLIP's image embeddings, or a teacher's features), is its own class; on when ``references`` is set.

    ``references``: a folder of real images with one sub-folder per class (by class name or slug; a synclone
    dataset folder works too); every class of the dataset needs at least one. A centroid is the mean of the
    class's unit-norm embeddings, normalised again; nearest is by cosine (ties: the lower class index).
    """

    references: str | None = None


class KeepKFilter(StrictModel):
    """Keep at most ``k`` images per class, the best by ``by``."""

    k: int | None = Field(None, ge=1)
    by: Score = "p_label"


class FiltersConfig(StrictModel):
    degenerate: DegenerateFilter = DegenerateFilter()
    threshold: ThresholdFilter = ThresholdFilter()
    quantile: QuantileFilter = QuantileFilter()
    dedup: DedupFilter = DedupFilter()
    he: HeFilter = HeFilter()
    real_centroid: RealCentroidFilter = RealCentroidFilter()
    keep_k: KeepKFilter = KeepKFilter()
    # Unreadable images are always dropped first. Dedup runs before the top-k rules by default, so that
    # "top k" means k distinct images.
    order: list[Literal["degenerate", "threshold", "quantile", "real_centroid", "dedup", "he", "keep_k"]] = \
        list(FILTER_NAMES)

    @field_validator("order")
    @classmethod
    def _order_unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"filters.order lists a filter twice: {v}")
        return v

    @model_serializer(mode="wrap")
    def _without_unused_real_centroid(self, handler):
        # Configs that do not use the real-centroid filter dump (and so hash, in recipe stages and curated
        # dataset records) exactly as they did before it existed.
        data = handler(self)
        if isinstance(data, dict) and self.real_centroid.references is None:
            data.pop("real_centroid", None)
            data["order"] = [n for n in data.get("order", []) if n != "real_centroid"]
        return data


class StatsConfig(StrictModel):
    enabled: bool = True
    bins: int = Field(30, ge=2)
    # Example grids: at most this many kept / dropped images per class.
    examples_per_class: int = Field(8, ge=0)
    thumb_size: int = Field(64, ge=8, le=512)


class RefillConfig(StrictModel):
    """Regenerate-until-full: top every class back up to ``target_per_class`` kept images.

    After filtering, each class with fewer kept images gets new ones from ``synclone generate`` with fresh plan
    ids (images ``images_per_class``, ``images_per_class + 1``, ... of that class, so new ids and seeds), written
    to ``<output>/refill/round-NNN/`` and scored through the same cache and filters; repeated until every class
    is full or ``max_rounds`` rounds exist, then a warning names the short classes. The top-k rule (He et al.'s
    ``k`` when ``filters.he`` is enabled, else ``keep_k``) then keeps exactly ``target_per_class`` per class.
    The source must be a dataset folder made by ``synclone generate``.
    """

    target_per_class: int = Field(ge=1)
    # Rounds of generation in total (rounds made by earlier runs into the same output count).
    max_rounds: int = Field(3, ge=0)
    # The config that made the source: None = <input>/config.yaml (synclone generate writes it), a YAML path,
    # or the config itself as a mapping.
    generate_config: str | dict[str, Any] | None = None
    # Dotted overrides on that config, e.g. ["generator.device=cuda", "batch_size=32"] (they enter the
    # fingerprint like any generate setting, so keep them the same when resuming).
    generate_overrides: list[str] = []
    # A short class needs `need` more kept images; it gets need / max(its keep rate so far, min_keep_rate)
    # new ones per round (so at most need / min_keep_rate), capped by max_per_round.
    min_keep_rate: float = Field(0.1, gt=0.0, le=1.0)
    max_per_round: int | None = Field(None, ge=1)


class CurateConfig(StrictModel):
    """``synclone curate``: score a dataset folder, filter it, write a curated dataset folder."""

    input: str
    output: str
    # Where embeddings are cached (shared by every curate run over these images); default <input>/.curate_cache.
    cache_dir: str | None = None
    scorer: ScorerConfig = ScorerConfig()
    filters: FiltersConfig = FiltersConfig()
    # none: metadata points at the source files; hardlink / copy: put the kept files into output/train/.
    materialize: Literal["none", "hardlink", "copy"] = "none"
    # With materialize=none: file_name relative to output/train/ (the pair moves together) or absolute.
    paths: Literal["relative", "absolute"] = "relative"
    # Grey level behind transparent pixels (RGBA, LA, palette with transparency).
    alpha_background: int = Field(0, ge=0, le=255)
    stats: StatsConfig = StatsConfig()
    # Replace a non-empty output folder that is not an earlier curate output.
    overwrite: bool = False
    progress: bool = True
    # Where the images are scored: this process (local) or a Ray cluster; see synclone.util.executor.
    executor: ExecutorConfig = ExecutorConfig()
    # Regenerate-until-full (see RefillConfig); off by default.
    refill: RefillConfig | None = None
    # Unreadable images are dropped and listed in <output>/skipped_images.txt; past this share (or count), an error.
    max_unreadable: float = max_unreadable_field("images")
