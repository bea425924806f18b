"""What ``synclone run --dry-run`` checks before any work starts, collected into one list of problems.

A full-scale recipe on a machine without the hub typically lacks several things at once (generator
weights, CLIP weights, ImageNet and its shifted test sets); the user should see all of them in one go,
not one per attempt. Every check here raises :class:`UserError`; :class:`Problems` collects them.

Checked: configs (by :func:`synclone.recipe.plan.plan`), references between stages, datasets (built-ins
present, folders exist), weights reachable offline (generators, CLIP scorers and backbones, timm
weights, model folders to start from or to evaluate), and that label spaces agree across stages.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from synclone.errors import MissingResource, UserError
from synclone.recipe.plan import FewshotStage, Problems

# --- weights ------------------------------------------------------------------------------------------


def check_open_clip(model: str, pretrained: str | None, where: str) -> None:
    """An open_clip model name plus pretrained tag or file: is the checkpoint on this machine?"""
    if model.startswith("local-dir:"):
        folder = Path(model[len("local-dir:"):])
        if not (folder / "open_clip_config.json").is_file():
            raise MissingResource(f"{where}: open_clip folder '{folder}' does not exist or has no "
                                  "open_clip_config.json")
        return
    if model.endswith(".json") and not Path(model).is_file():
        raise MissingResource(f"{where}: open_clip model config '{model}' does not exist")
    if not pretrained:
        return
    if Path(pretrained).is_file():
        return
    if Path(pretrained).suffix in (".pt", ".pth", ".bin", ".safetensors") or "/" in pretrained:
        raise MissingResource(f"{where}: checkpoint '{pretrained}' does not exist")
    import open_clip

    if not model.endswith(".json") and model not in open_clip.list_models():
        raise UserError(f"{where}: unknown open_clip model '{model}'")
    cfg = open_clip.get_pretrained_cfg(model, pretrained) if not model.endswith(".json") else {}
    if not cfg:
        raise UserError(f"{where}: '{pretrained}' is neither a file nor a pretrained tag of open_clip model "
                        f"'{model}'")
    hub = cfg.get("hf_hub", "").strip("/")
    if hub and _hub_cached(hub):
        return
    url = cfg.get("url", "")
    if url and (Path.home() / ".cache" / "clip" / url.rsplit("/", 1)[-1]).is_file():
        return
    src = f"hub repo '{hub}'" if hub else f"'{url}'"
    raise MissingResource(f"{where}: weights of open_clip '{model}' ('{pretrained}') are not on this machine; "
                          f"download {src} where there is internet (e.g. huggingface-cli download {hub or '...'}), "
                          "or set pretrained to a checkpoint file")


def _hub_cached(repo: str) -> bool:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot_download(repo, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        return False
    return True


def check_hf_model(name: str, where: str, marker: str = "config.json") -> None:
    """A transformers/diffusers folder or a hub id already in the local cache."""
    from synclone.models.hub import resolve_model

    try:
        resolve_model(name, marker=marker, what="model", local_files_only=True)
    except UserError as err:
        raise MissingResource(f"{where}: {err}") from None


def check_timm_weights(arch: str, where: str) -> None:
    """timm's own pretrained weights for ``arch`` (``pretrained: default``): in the hub cache?"""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(arch)
    except Exception:  # noqa: BLE001 - timm raises several types for unknown names
        cfg = None
    if cfg is None:
        raise UserError(f"{where}: timm has no pretrained weights named '{arch}' (see timm.list_pretrained())")
    hub = getattr(cfg, "hf_hub_id", None)
    if hub and _hub_cached(hub.split("@")[0]):
        return
    raise MissingResource(f"{where}: timm's pretrained weights of '{arch}' are not on this machine; download "
                          f"{hub or 'them'} where there is internet, or give a checkpoint file")


def check_backbone(cfg: Any, where: str) -> None:
    """A frozen backbone of classifier tuning / linear probing (:class:`synclone.train.features.BackboneConfig`)."""
    if cfg.kind == "open_clip":
        check_open_clip(cfg.name, cfg.pretrained, where)
    elif cfg.kind == "hf_clip":
        if not (Path(cfg.name) / "config.json").is_file():
            raise MissingResource(f"{where}: '{cfg.name}' is not a transformers CLIP folder (no config.json); "
                                  "download it and save it with save_pretrained")
    elif cfg.kind == "synclone":
        _check_model_folder(cfg.name, where)
    elif cfg.kind == "timm" and cfg.pretrained:
        if cfg.pretrained == "default":
            check_timm_weights(cfg.name, where)
        elif not Path(cfg.pretrained).is_file():
            raise MissingResource(f"{where}: checkpoint '{cfg.pretrained}' does not exist")


def _check_model_folder(folder: str, where: str) -> None:
    if not (Path(folder) / "config.json").is_file():
        raise MissingResource(f"{where}: model folder '{folder}' does not exist (or has no config.json)")


# --- label spaces -------------------------------------------------------------------------------------


def check_generator(cfg: Any) -> None:
    """The generator of a generate stage is reachable offline, and real guidance has its reference images."""
    from synclone.models.hub import resolve_model

    if cfg.generator.backend in ("img2img", "image_variation"):
        refs = (cfg.generator.options or {}).get("references")
        if not refs or not Path(refs).is_dir():
            raise MissingResource(f"generator.options.references: reference folder '{refs}' does not exist (real "
                                  "guidance needs a few real images per class)")
    try:
        resolve_model(cfg.generator.model, marker="model_index.json", what="generator", local_files_only=True)
    except UserError as err:
        raise MissingResource(str(err)) from None


def generated_space(cfg: Any) -> Any:
    """The label space a generate stage will produce, known before generating."""
    from synclone.labels import LabelSpace, get_label_space
    from synclone.models.hub import resolve_model

    try:
        folder = Path(resolve_model(cfg.generator.model, marker="model_index.json", what="generator",
                                    local_files_only=True).location)
    except UserError:
        folder = None  # reported by check_generator; the label space may still be known from 'labels'
    meta = folder / "synclone.json" if folder is not None else None
    own = LabelSpace.from_dict(json.loads(meta.read_text(encoding="utf-8"))["label_space"]) \
        if meta is not None and meta.is_file() else None
    if isinstance(cfg.labels, list):
        space = LabelSpace.from_names([str(c) for c in cfg.labels], name="custom")
    elif isinstance(cfg.labels, str):
        try:
            space = get_label_space(cfg.labels)
        except UserError as err:
            raise (MissingResource if "does not exist" in str(err) else UserError)(str(err)) from None
    elif own is not None:
        return own
    elif folder is None:
        return None
    else:
        raise UserError(f"generator '{cfg.generator.model}' has no label space of its own: set 'labels' in its stage")
    if cfg.generator.backend == "classcond" and own is not None:
        missing = [c for c in space.classes if c not in own.classes]
        if missing:
            raise UserError(f"class-conditional generator '{cfg.generator.model}' cannot make "
                            f"{', '.join(map(repr, missing[:5]))}: it knows {own.describe()}")
    return space


def data_space(spec: str | None, spaces: dict[str, Any], where: str) -> Any:
    """Label space of a dataset spec: a built-in, the output of an earlier stage, or an existing folder."""
    from synclone.data.imagenet import LAYOUTS, detect_layout
    from synclone.data.sources import BUILTIN
    from synclone.labels import BUILTIN_SPACES, imagenet1k_space

    if spec is None:
        return None
    name, _, rest = spec.partition(":")
    if name in BUILTIN:
        return BUILTIN_SPACES[name]
    if name in LAYOUTS:  # "imagenet-r:PATH": an ImageNet-family folder named by its layout
        if not Path(rest).is_dir():
            raise MissingResource(f"{where}: {name} folder '{rest}' does not exist")
        return imagenet1k_space()
    for folder, space in spaces.items():
        if Path(spec) == Path(folder):
            return space
    path = Path(spec)
    if not path.is_dir():
        raise MissingResource(f"{where}: dataset '{spec}' is neither a built-in ({', '.join(sorted(BUILTIN))}), "
                              "the output of a stage of this recipe, nor an existing folder")
    if not (path / "metadata.jsonl").is_file() and not (path / "train" / "metadata.jsonl").is_file() \
            and detect_layout(path) is not None:
        return imagenet1k_space()
    from synclone.data.folder import read_dataset_folder

    return read_dataset_folder(spec)[1]


def _is_builtin(spec: str) -> bool:
    from synclone.data.eval_sets import OOD_BUILTINS
    from synclone.data.sources import BUILTIN

    return spec.partition(":")[0] in (*BUILTIN, *OOD_BUILTINS)


def _aligned(a: Any, b: Any, what_a: str, what_b: str) -> None:
    if a is not None and b is not None:
        a.check_aligned(b, what_a, what_b)


# --- the whole recipe ---------------------------------------------------------------------------------


def check(stages: list[Any], problems: Problems, planned: set[str] | frozenset[str] = frozenset()) -> None:
    """Every check that needs no work: data present, weights reachable, folders exist, labels aligned.

    ``planned``: output folders the recipe means to make, also of stages whose config failed (already
    reported), so that their consumers are not reported again.
    """
    from synclone.labels import get_label_space
    from synclone.models.pretrained import PretrainedConfig
    from synclone.train.knn import KnnConfig
    from synclone.train.probe import ClassifierTuningConfig, LinearProbeConfig
    from synclone.train.transfer_eval import TransferConfig

    if any("fashion_mnist" in json.dumps(s.cfg.model_dump(mode="json")) for s in stages):
        from synclone.data.fashion_mnist import locate

        with problems.catch("Fashion-MNIST"):
            try:
                locate("train")
                locate("test")
            except UserError as err:
                raise MissingResource(str(err)) from None
    # Output folder of a stage (dataset or model) -> the label space it will hold; None while unknown (a
    # stage whose own checks failed), so its consumers are not reported a second time as "missing".
    spaces: dict[str, Any] = dict.fromkeys(planned, None)
    for s in stages:
        kind = s.name.split(".")[0]
        cfg = s.cfg
        spaces.update(dict.fromkeys(_outputs(s), None))
        if kind == "domain":
            from synclone.data.shifted import SHOTS, TEST
            from synclone.labels import BUILTIN_SPACES

            for sub in (SHOTS, TEST):
                spaces[str(Path(cfg.output) / sub)] = BUILTIN_SPACES["fashion_mnist"]
        elif kind == "finetune":
            with problems.catch(s.name):
                if cfg.data not in spaces:
                    data_space(cfg.data, spaces, f"{s.name}.data")
                if not str(cfg.model).startswith("builtin:"):
                    check_hf_model(cfg.model, f"{s.name}.model", marker="model_index.json")
        elif kind == "generate":
            with problems.catch(s.name):
                if cfg.generator.model not in spaces:  # a fine-tuned pipeline of this recipe is made first
                    check_generator(cfg)
            with problems.catch(f"{s.name}.labels"):
                spaces[str(s.folder)] = generated_space(cfg)
        elif kind == "curate":
            with problems.catch("curate.input"):
                spaces[str(s.folder)] = data_space(cfg.input, spaces, "curate.input")
            with problems.catch("curate.scorer"):
                if cfg.scorer.kind == "teacher":
                    if cfg.scorer.model not in spaces:
                        _check_model_folder(cfg.scorer.model, "curate.scorer.model")
                elif cfg.scorer.kind == "openclip":
                    check_open_clip(cfg.scorer.model, cfg.scorer.pretrained, "curate.scorer")
                else:
                    check_hf_model(cfg.scorer.model, "curate.scorer")
        elif isinstance(cfg, PretrainedConfig):
            with problems.catch(s.name):
                if cfg.pretrained == "default":
                    check_timm_weights(cfg.arch, f"{s.name}.pretrained")
                elif not Path(cfg.pretrained).is_file():
                    raise MissingResource(f"{s.name}.pretrained: checkpoint '{cfg.pretrained}' does not exist")
            if cfg.head:
                with problems.catch(s.name):
                    if not Path(cfg.head).is_file():
                        raise MissingResource(f"{s.name}.head: linear head file '{cfg.head}' does not exist")
            with problems.catch(s.name):
                spaces[str(Path(cfg.output) / "model")] = get_label_space(cfg.labels)
        elif isinstance(cfg, TransferConfig):
            for name, folder in cfg.encoders.items():
                if folder and folder not in spaces:
                    with problems.catch(s.name):
                        _check_model_folder(folder, f"{s.name}.encoders.{name}")
            with problems.catch(s.name):
                _aligned(data_space(cfg.data, spaces, f"{s.name}.data"), data_space(cfg.test, spaces, f"{s.name}.test"),
                         f"{s.name}'s data", f"its test data '{cfg.test}'")
        elif isinstance(cfg, ClassifierTuningConfig | LinearProbeConfig | KnnConfig):
            with problems.catch(s.name):
                check_backbone(cfg.backbone, f"{s.name}.backbone")
            d = cfg.data
            train_specs = [d.train] if isinstance(d.train, str) else list(d.train)
            found = []
            for i, spec in enumerate(train_specs):
                with problems.catch(s.name):
                    found.append((spec, data_space(spec, spaces, f"{s.name}.data.train[{i}]")))
            for spec, other in (("val", d.val), ("test", d.test)):
                with problems.catch(s.name):
                    found.append((other, data_space(other, spaces, f"{s.name}.data.{spec}")))
            found = [(spec, sp) for spec, sp in found if sp is not None]
            with problems.catch(s.name):
                for spec, sp in found[1:]:
                    _aligned(found[0][1], sp, f"{s.name}'s data '{found[0][0]}'", f"'{spec}'")
            if found:
                spaces[cfg.output] = found[0][1]
        elif kind in ("teacher", "train"):
            tcfg = cfg.train if isinstance(cfg, FewshotStage) else cfg
            real = syn = None
            with problems.catch(s.name):
                real = data_space(tcfg.data.real, spaces, f"{s.name}.data.real")
            with problems.catch(s.name):
                syn = data_space(tcfg.data.synthetic, spaces, f"{s.name}.data.synthetic")
            with problems.catch(s.name):
                _aligned(real, syn, f"{s.name}'s real data", f"{s.name}'s synthetic data")
            if tcfg.model.init:
                with problems.catch(s.name):
                    _check_model_folder(tcfg.model.init, f"{s.name}.model.init")
            space = real if real is not None else syn
            if isinstance(cfg, FewshotStage):
                with problems.catch(s.name):
                    _aligned(space, data_space(cfg.eval_data, spaces, f"{s.name}.eval_data"), f"{s.name}'s data",
                             f"its eval_data '{cfg.eval_data}'")
                for seed in cfg.seeds:
                    spaces[str(Path(tcfg.output) / f"seed{seed}" / "model")] = space
            else:
                spaces[str(Path(tcfg.output) / "model")] = space
        elif kind == "evaluate":
            _check_evaluate(cfg, spaces, problems)


def _outputs(stage: Any) -> list[str]:
    """The folders a stage will make that later stages may read (datasets or model folders)."""

    cfg = stage.cfg
    kind = stage.name.split(".")[0]
    if kind in ("generate", "curate"):
        return [str(stage.folder)]
    if kind == "finetune":
        return [str(stage.folder), str(stage.folder / "pipeline")]
    if isinstance(cfg, FewshotStage):
        return [str(Path(cfg.train.output) / f"seed{seed}" / "model") for seed in cfg.seeds]
    if kind in ("teacher", "train"):
        out = Path(cfg.output)
        return [str(out if out.name == "model" else out / "model")]
    return []


def _check_evaluate(cfg: Any, spaces: dict[str, Any], problems: Problems) -> None:
    from synclone.labels import LabelSpace
    from synclone.models.io import read_model_config

    clean = None
    with problems.catch("evaluate.data"):
        clean = data_space(cfg.data, spaces, "evaluate.data")
    for name, folder in cfg.models.items():
        with problems.catch(f"evaluate model '{name}'"):
            if str(folder) in spaces:
                space = spaces[str(folder)]
            else:
                _check_model_folder(folder, f"evaluate.models.{name}")
                space = LabelSpace.from_dict(read_model_config(folder)["label_space"])
            _aligned(space, clean, f"model '{name}'", f"evaluation data '{cfg.data}'")
    for name, settings in cfg.probe_settings():
        for key in ("folder", "baselines_csv"):  # probe inputs the user brings (cue-conflict, IN-9, FOCUS, ...)
            value = getattr(settings, key, None)
            with problems.catch(f"evaluate.probes.{name}.{key}"):
                if value and not Path(value).exists():
                    raise MissingResource(f"evaluate.probes.{name}.{key}: '{value}' does not exist")
        for key, table in (getattr(settings, "baselines", None) or {}).items():  # published tables per shifted set
            csv = table if isinstance(table, str) else table.csv
            with problems.catch(f"evaluate.probes.{name}.baselines"):
                if not Path(csv).is_file():
                    raise MissingResource(f"evaluate.probes.{name}.baselines.{key}: table '{csv}' does not exist")
        for spec in getattr(settings, "datasets", None) or []:
            with problems.catch(f"evaluate.probes.{name}.datasets"):
                if name == "shift":
                    data_space(spec, spaces, f"evaluate.probes.{name}.datasets")
                elif not Path(spec).is_dir() and not _is_builtin(spec):
                    raise MissingResource(f"evaluate.probes.{name}.datasets: '{spec}' is neither a built-in nor "
                                          "a folder")
