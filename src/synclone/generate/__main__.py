"""``python -m synclone.generate CONFIG [key=value ...] [--dry-run]``; works under ``accelerate launch -m``.

The ``synclone generate`` CLI command does the same; this entry point lets ``accelerate launch``
start the generator in every process without the rest of the CLI.
"""

from __future__ import annotations

import argparse
import os
import sys

from synclone.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m synclone.generate", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML config (see synclone.generate.config)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. images_per_class=10")
    parser.add_argument("--dry-run", action="store_true", help="write the plan, time one batch, estimate time/disk")
    args = parser.parse_args(argv)
    from synclone.config import load_config
    from synclone.generate import GenerateConfig, generate

    try:
        cfg = load_config(GenerateConfig, args.config, args.overrides)
        from synclone.util.lock import output_lock

        with output_lock(cfg.output, " ".join(["python -m synclone.generate", args.config, *args.overrides])):
            out = generate(cfg, dry_run=args.dry_run)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return UserError.exit_code
    if os.environ.get("RANK", "0") == "0":  # one line, not one per process under accelerate launch
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
