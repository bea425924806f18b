"""LoRA adapter folders: what ``synclone generator finetune`` writes and ``generate`` loads (``generator.lora``).

An adapter folder holds the UNet's LoRA weights in diffusers' format (``pytorch_lora_weights.safetensors``,
written by ``StableDiffusionPipeline.save_lora_weights``) and ``synclone_adapter.json``: the base model it was
trained on (source and fingerprint), its rank and training record. A folder written by another tool (diffusers'
own training scripts) loads too when it holds one ``.safetensors`` file; its base model cannot be checked then.
Pickled weights (``.bin``, ``.pt``, ``.ckpt``, ``.pkl``) are never loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from synclone.errors import UserError
from synclone.util.files import file_sha256

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
ADAPTER_JSON = "synclone_adapter.json"
ADAPTER_NAME = "synclone"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def per_class_adapters(folder: str | Path) -> dict[str, Path] | None:
    """Class name -> adapter folder of a per-class adapter folder (``per_class: true``), or ``None``."""
    classes = adapter_info(folder).get("per_class")
    if not classes:
        return None
    return {name: Path(folder) / slug for name, slug in classes.items()}


def adapter_weights(folder: str | Path) -> Path:
    """The adapter's safetensors file; :class:`UserError` when the folder is missing, pickled or ambiguous."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"LoRA adapter folder '{root}' does not exist (generator.lora): make one with "
                        "synclone generator finetune")
    if (root / LORA_WEIGHTS).is_file():
        return root / LORA_WEIGHTS
    found = sorted(p for p in root.iterdir() if p.is_file() and p.suffix == ".safetensors")
    if len(found) == 1:
        return found[0]
    pickles = sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)
    if not found and pickles:
        raise UserError(f"LoRA adapter folder '{root}' holds pickled weights ({', '.join(pickles[:3])}) and no "
                        f".safetensors file: synclone loads safetensors only; convert the adapter to safetensors")
    if not found:
        raise UserError(f"LoRA adapter folder '{root}' has no {LORA_WEIGHTS}: is it an adapter folder?")
    raise UserError(f"LoRA adapter folder '{root}' holds {len(found)} .safetensors files and no {LORA_WEIGHTS}: "
                    "keep only the adapter's weight file")


def adapter_info(folder: str | Path) -> dict:
    """``synclone_adapter.json`` of an adapter folder, or ``{}`` for a folder another tool wrote."""
    path = Path(folder) / ADAPTER_JSON
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"'{path}' is not valid JSON ({err}): re-run synclone generator finetune") from None


def adapter_fingerprint(folder: str | Path) -> str:
    """sha256 of the adapter's weight file (first 16 hex digits): it enters the dataset's fingerprint.

    For a per-class folder: the hash of every class's name and weight hash, in class order."""
    if Path(folder).is_dir():
        classes = per_class_adapters(folder)
        if classes is not None:
            import hashlib

            h = hashlib.sha256()
            for name, sub in classes.items():
                h.update(name.encode() + b"\0" + file_sha256(adapter_weights(sub)).encode() + b"\n")
            return h.hexdigest()[:16]
    return file_sha256(adapter_weights(folder))[:16]


def check_adapter_base(folder: str | Path, base_source: str, base_revision: str | None) -> None:
    """Refuse an adapter trained on another base model, naming both (folders without a record pass)."""
    info = adapter_info(folder)
    base = info.get("base_model") or {}
    made_for = base.get("revision")
    if made_for is not None and base_revision is not None and made_for != base_revision:
        raise UserError(
            f"LoRA adapter '{folder}' was made for base model '{base.get('source')}' ({made_for}) but the "
            f"generator is '{base_source}' ({base_revision}): use an adapter fine-tuned from this model"
        )


def load_lora(pipe, folder: str | Path, scale: float, name: str = ADAPTER_NAME) -> None:
    """Load the adapter into ``pipe`` (diffusers' ``load_lora_weights``, safetensors only) at ``scale``, under
    ``name`` (several named adapters can be loaded; the last one loaded is the active one).

    Scale 0 adds exactly zero to every adapted layer, so it gives the base pipeline's images bit for bit.
    """
    weights = adapter_weights(folder)
    try:
        pipe.load_lora_weights(str(weights.parent), weight_name=weights.name, adapter_name=name,
                               use_safetensors=True)
    except (ValueError, RuntimeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"LoRA adapter '{folder}' does not fit this generator's UNet ({first[:200]}): was it made "
                        "for another base model?") from None
    pipe.set_adapters([name], adapter_weights=[float(scale)])


def merge_lora_into_unet(unet, folder: str | Path, scale: float) -> None:
    """Add ``scale`` times the adapter in ``folder`` to ``unet``'s weights (a ``UNet2DModel``, which has no
    diffusers adapter mixin): peft injects the adapter's layers, loads them and merges them into the base weights,
    so sampling costs what the base model costs. Scale 0 adds exactly zero to every weight."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    weights = adapter_weights(folder)
    state = {k.removeprefix("unet."): v for k, v in load_file(str(weights)).items()}
    state = convert_unet_state_dict_to_peft(state)
    modules = sorted({k.split(".lora_A.")[0] for k in state if ".lora_A." in k})
    if not modules:
        raise UserError(f"LoRA adapter '{folder}' holds no LoRA layers (no lora.down / lora_A weights)")
    settings = adapter_info(folder).get("lora") or {}
    rank = int(settings.get("rank") or state[f"{modules[0]}.lora_A.weight"].shape[0])
    config = LoraConfig(r=rank, lora_alpha=settings.get("alpha") or rank, target_modules=modules)
    missing = [m for m in modules if m not in dict(unet.named_modules())]
    if missing:
        raise UserError(f"LoRA adapter '{folder}' does not fit this generator's UNet (no layer '{missing[0]}'): "
                        "was it made for another base model?")
    try:
        inject_adapter_in_model(config, unet, adapter_name=ADAPTER_NAME)
        result = set_peft_model_state_dict(unet, state, adapter_name=ADAPTER_NAME)
    except (ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"LoRA adapter '{folder}' does not fit this generator's UNet ({first[:200]}): was it made "
                        "for another base model?") from None
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
    if unexpected:
        raise UserError(f"LoRA adapter '{folder}' has weights this UNet cannot take ('{unexpected[0]}')")
    for module in unet.modules():
        if isinstance(module, LoraLayer):
            module.set_scale(ADAPTER_NAME, float(scale))
            module.merge(adapter_names=[ADAPTER_NAME])
