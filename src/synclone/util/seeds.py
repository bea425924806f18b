"""Every seed synclone derives, in one place.

Seeds are derived by hashing, never drawn from one running stream: a generated image, a corrupted image, an
attack's random start or a training step then depends only on (run seed, its own id), not on batch size, worker
count, sharding or resume. Each stream has its own function below; their exact formulas are part of the
results they produce (datasets on disk, cached logits, published tables), so they are pinned by golden tests
and never changed in place: a new stream gets a new function.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np

# torch.Generator.manual_seed takes 64-bit seeds; 63 bits keep them positive int64 (parquet, numpy).
SEED_BITS = 63
_MASK64 = 0xFFFFFFFFFFFFFFFF
_GOLDEN = 0x9E3779B97F4A7C15


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, e.g. ``derive_seed(run_seed, "image", job_id)``; stable across runs and hosts.

    The general-purpose derivation (sha256): plan image seeds, retries, prompt and caption draws.
    """
    text = "synclone-seed\x1f" + "\x1f".join(str(p) for p in parts)
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << SEED_BITS) - 1)


def derived_rng(*parts: object) -> random.Random:
    """A ``random.Random`` seeded with :func:`derive_seed` of the parts."""
    return random.Random(derive_seed(*parts))


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers by splitmix-style mixing: the training loop's per-step and per-epoch seeds.

    No hashing library call, so it is cheap enough to run for every step of a long training run.
    """
    h = 0x2545F4914F6CDD1D
    for p in parts:
        h = (h ^ (int(p) & _MASK64)) * _GOLDEN & _MASK64
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def corruption_seed(seed: int, name: str, severity: int, index: int) -> int:
    """The 64-bit seed of one image's corruption stream: a hash (blake2b) of (seed, corruption, severity, index)."""
    key = f"synclone-corruption/{int(seed)}/{name}/{int(severity)}/{int(index)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def attack_seeds(seed: int, start: int, n: int) -> list[int]:
    """Random-start seeds of an attack for images ``start .. start + n - 1`` (NumPy SeedSequence of (seed, i))."""
    return [int(np.random.SeedSequence([int(seed), i]).generate_state(1, np.uint64)[0])
            for i in range(start, start + n)]
