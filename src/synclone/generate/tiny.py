"""Tiny randomly initialised pipelines for tests, benchmarks and smoke runs: nothing is downloaded.

The components follow the dummy components of diffusers' own Stable Diffusion tests (a two-block
``UNet2DConditionModel``, a small ``AutoencoderKL``, a ``CLIPTextModel`` from a ``CLIPTextConfig``),
saved with ``save_pretrained`` so they load by path exactly as a user's model folder would. The CLIP
tokenizer is built offline from the BPE merges that open_clip ships
(``open_clip/bpe_simple_vocab_16e6.txt.gz``, the file OpenAI released with CLIP).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import torch

# Special tokens of the CLIP BPE vocabulary (OpenAI CLIP, simple_tokenizer.py).
_SOT, _EOT = "<|startoftext|>", "<|endoftext|>"


def clip_tokenizer(n_merges: int = 2000, max_length: int = 32):
    """A ``CLIPTokenizer`` from open_clip's bundled BPE file, keeping the first ``n_merges`` merges.

    transformers 5 ignores ``vocab_file=``/``merges_file=`` here, so the vocabulary and merges are
    passed as objects, built the way OpenAI's ``SimpleTokenizer`` builds them.
    """
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    bpe = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : n_merges + 1]]  # line 0 is a version header
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m) for m in merges] + [_SOT, _EOT]
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def build_tiny_text2img(
    path: str | Path,
    *,
    seed: int = 0,
    unet_channels: tuple[int, int] = (32, 64),
    vae_channels: tuple[int, int] = (32, 64),
    layers_per_block: int = 2,
    text_layers: int = 5,
    image_size: int = 32,
    safety_threshold: float | None = None,
) -> Path:
    """Save a tiny random ``StableDiffusionPipeline`` to ``path`` and return the path.

    ``image_size`` is the default output size in pixels (the VAE halves it). ``safety_threshold``
    adds a tiny random ``StableDiffusionSafetyChecker`` whose 17 concept thresholds are all set to
    that value: an image is flagged when its embedding's cosine to any concept exceeds it, so ``-2``
    flags every image, ``2`` none, and values in between flag some, depending on the image.
    """
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer()
    unet, vae = _tiny_unet_and_vae(unet_channels, vae_channels, layers_per_block, image_size)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=text_layers,
            vocab_size=len(tokenizer),
            max_position_embeddings=tokenizer.model_max_length,
        )
    )
    scheduler = _sd_scheduler()
    safety_checker, feature_extractor = None, None
    if safety_threshold is not None:
        safety_checker, feature_extractor = _tiny_safety_checker(safety_threshold)
    pipe = StableDiffusionPipeline(
        unet=unet,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        safety_checker=safety_checker,
        feature_extractor=feature_extractor,
        requires_safety_checker=safety_checker is not None,
    )
    out = Path(path)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def _tiny_unet_and_vae(unet_channels, vae_channels, layers_per_block: int, image_size: int):
    """The denoiser (cross-attention over 32-wide states) and the VAE of the tiny pipelines, in this RNG order."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel(
        block_out_channels=unet_channels,
        layers_per_block=layers_per_block,
        sample_size=image_size // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=min(32, unet_channels[0]),
    )
    vae = AutoencoderKL(
        block_out_channels=list(vae_channels),
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=min(32, vae_channels[0]),
        sample_size=image_size,
    )
    return unet, vae


def _sd_scheduler():
    """The scheduler settings of Stable Diffusion v1 (scaled-linear betas), as in diffusers' tests."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )


def build_tiny_image_variation(path: str | Path, *, seed: int = 0, unet_channels: tuple[int, int] = (32, 64),
                               vae_channels: tuple[int, int] = (32, 64), layers_per_block: int = 1,
                               image_size: int = 16, vision_layers: int = 2) -> Path:
    """Save a tiny random ``StableDiffusionImageVariationPipeline`` to ``path``: the UNet of the text-to-image one,
    conditioned on a tiny ``CLIPVisionModelWithProjection``'s 32-wide image embedding instead of a prompt."""
    from diffusers import StableDiffusionImageVariationPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    unet, vae = _tiny_unet_and_vae(unet_channels, vae_channels, layers_per_block, image_size)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=vision_layers, image_size=32,
        patch_size=8, projection_dim=32))
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pipe = StableDiffusionImageVariationPipeline(vae=vae, image_encoder=encoder, unet=unet, scheduler=_sd_scheduler(),
                                                 safety_checker=None, feature_extractor=processor,
                                                 requires_safety_checker=False)
    out = Path(path)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def _tiny_safety_checker(threshold: float):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                  image_size=32, patch_size=8)
    text = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=99)
    checker = StableDiffusionSafetyChecker(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16))
    with torch.no_grad():
        checker.concept_embeds.normal_()
        checker.special_care_embeds.normal_()
        checker.concept_embeds_weights.fill_(threshold)
        # The "special care" concepts only lower the other thresholds; keep them out of the way.
        checker.special_care_embeds_weights.fill_(2.0)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return checker, processor


def build_tiny_seq2seq(path: str | Path, words: list[str] | None = None, seed: int = 0) -> Path:
    """Save a tiny random T5 (``T5ForConditionalGeneration``) and a word-level tokenizer to ``path``.

    The tokenizer is a ``tokenizers`` WordLevel model over ``words`` (plus pad/eos/unk), wrapped in a
    ``PreTrainedTokenizerFast`` so ``AutoTokenizer.from_pretrained(path)`` loads it offline.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    words = words or ("a photo of the on in with and dress coat shirt bag sandal sneaker trouser pullover boot "
                      "red blue small large beach street park night old new").split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(vocab), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    model = T5ForConditionalGeneration(config)
    out = Path(path)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
