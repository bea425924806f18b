"""Seeds derived by hashing, so an image's seed depends on the run seed and its id only.

Hashing (rather than drawing from one random stream) is what makes an image independent of batch
size, worker count, sharding and resume: no image's seed depends on how many were drawn before it.
"""

from __future__ import annotations

import hashlib
import random

# torch.Generator.manual_seed takes 64-bit seeds; 63 bits keep them positive int64 (parquet, numpy).
SEED_BITS = 63


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, e.g. ``derive_seed(run_seed, "image", job_id)``; stable across runs and hosts."""
    text = "synclone-seed\x1f" + "\x1f".join(str(p) for p in parts)
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << SEED_BITS) - 1)


def derived_rng(*parts: object) -> random.Random:
    """A ``random.Random`` seeded with :func:`derive_seed` of the parts."""
    return random.Random(derive_seed(*parts))
