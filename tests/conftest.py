"""Shared test set-up. pytest puts this folder on ``sys.path`` (it holds the conftest), so the tests import their
helpers (``_tiny_clip``, ``_probe_helpers``, ...) directly; no test edits ``sys.path``."""

import os

# The field libraries must never reach a model hub from the tests (there is no network on CI): without these a
# failed hub lookup retries DNS for minutes. `make test` sets them too; this covers a bare `pytest`.
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
