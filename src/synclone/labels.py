"""Label spaces: ordered class names, filesystem-safe slugs and mappings to other spaces.

Every dataset and model carries a :class:`LabelSpace`. Evaluation aligns a model's space with a
dataset's before it counts anything, so a model trained on one ordering of the classes is never
scored against another by accident.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

from synclone.errors import UserError

_SLUG_BAD = re.compile(r"[^a-z0-9]+")
# A slug (ASCII, so one byte a character) is a folder name; this leaves room under the 255-byte file-name limit.
SLUG_MAX_BYTES = 96


def slugify(name: str) -> str:
    """A filesystem-safe slug: lower-case ASCII letters, digits and single underscores.

    Path separators, dots and anything else that could climb out of a folder ("../x", "a/b") turn
    into underscores, so a class name never becomes a path outside the dataset folder.
    """
    ascii_name = unicodedata.normalize("NFKD", str(name)).encode("ascii", "ignore").decode("ascii")
    slug = _SLUG_BAD.sub("_", ascii_name.lower()).strip("_")
    if not slug:
        # A name made only of symbols or non-Latin letters still needs a stable, unique folder.
        slug = "class_" + hashlib.sha1(str(name).encode("utf-8")).hexdigest()[:8]
    if len(slug) > SLUG_MAX_BYTES:
        # File names are limited to 255 bytes and a slug is a folder name that files are put under: keep a
        # readable head and make it unique again with a hash of the whole name.
        digest = hashlib.sha1(str(name).encode("utf-8")).hexdigest()[:10]
        slug = slug[: SLUG_MAX_BYTES - len(digest) - 1].rstrip("_") + "_" + digest
    return slug


@dataclass(frozen=True)
class LabelSpace:
    """An ordered list of class names with unique slugs.

    ``mappings`` maps the name of another label space to a list giving, for every class here, the
    index of the matching class there (or -1 when it has none); e.g. ImageNet-1k -> the 16
    shape-bias categories.
    """

    name: str
    classes: tuple[str, ...]
    slugs: tuple[str, ...] = ()
    mappings: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        classes = tuple(str(c) for c in self.classes)
        if not classes:
            raise UserError(f"label space '{self.name}' is empty: give at least one class name")
        seen: dict[str, int] = {}
        for i, c in enumerate(classes):
            if not c.strip():
                raise UserError(f"label space '{self.name}': class {i} has an empty name")
            if c in seen:
                raise UserError(f"label space '{self.name}': class name '{c}' appears twice (at {seen[c]} and {i})")
            seen[c] = i
        slugs = tuple(self.slugs) if self.slugs else _unique_slugs(classes)
        if len(slugs) != len(classes):
            raise UserError(f"label space '{self.name}': {len(slugs)} slugs for {len(classes)} classes")
        if len(set(slugs)) != len(slugs):
            raise UserError(f"label space '{self.name}': slugs are not unique")
        for s in slugs:
            if (s != slugify(s) and not re.fullmatch(r"[a-z0-9_]+", s)) or len(s) > SLUG_MAX_BYTES:
                raise UserError(f"label space '{self.name}': slug '{s[:40]}' is not filesystem-safe (lower-case "
                                f"letters, digits and '_', at most {SLUG_MAX_BYTES} bytes)")
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "slugs", slugs)
        object.__setattr__(self, "mappings", {k: tuple(int(i) for i in v) for k, v in self.mappings.items()})

    def __len__(self) -> int:
        return len(self.classes)

    def index(self, name: str) -> int:
        """Index of a class given its name or its slug."""
        try:
            return self.classes.index(name)
        except ValueError:
            pass
        try:
            return self.slugs.index(name)
        except ValueError:
            raise UserError(f"class '{name}' is not in label space '{self.name}' ({self.describe()})") from None

    def describe(self, limit: int = 6) -> str:
        head = ", ".join(self.classes[:limit])
        return f"{len(self)} classes: {head}{', ...' if len(self) > limit else ''}"

    @property
    def fingerprint(self) -> str:
        """Short hash of the ordered class names; equal spaces have equal fingerprints."""
        return hashlib.sha1("\n".join(self.classes).encode("utf-8")).hexdigest()[:12]

    def to_dict(self) -> dict:
        out: dict = {"name": self.name, "classes": list(self.classes), "slugs": list(self.slugs)}
        if self.mappings:
            out["mappings"] = {k: list(v) for k, v in self.mappings.items()}
        return out

    @classmethod
    def from_dict(cls, d: dict) -> LabelSpace:
        if not isinstance(d, dict) or "classes" not in d:
            raise UserError("a label space needs a 'classes' list")
        return cls(
            name=str(d.get("name", "custom")),
            classes=tuple(d["classes"]),
            slugs=tuple(d.get("slugs") or ()),
            mappings={k: tuple(v) for k, v in (d.get("mappings") or {}).items()},
        )

    @classmethod
    def from_names(cls, names: Iterable[str], name: str = "custom") -> LabelSpace:
        return cls(name=name, classes=tuple(names))

    def check_aligned(self, other: LabelSpace, what: str = "model", other_what: str = "dataset") -> None:
        """Raise a :class:`UserError` naming the mismatch unless both spaces list the same classes in order."""
        if self.classes == other.classes:
            return
        if set(self.classes) == set(other.classes):
            first = next(i for i, (a, b) in enumerate(zip(self.classes, other.classes, strict=True)) if a != b)
            raise UserError(
                f"label spaces differ in order: {what} '{self.name}' has '{self.classes[first]}' at index {first}, "
                f"{other_what} '{other.name}' has '{other.classes[first]}'; reorder one of them or pass a mapping"
            )
        missing = [c for c in other.classes if c not in self.classes]
        extra = [c for c in self.classes if c not in other.classes]
        parts = []
        if missing:
            parts.append(f"{other_what} classes missing from the {what}: {_short(missing)}")
        if extra:
            parts.append(f"{what} classes not in the {other_what}: {_short(extra)}")
        raise UserError(
            f"label spaces don't align ({what} '{self.name}' vs {other_what} '{other.name}'): " + "; ".join(parts)
        )


def _short(items: Sequence[str], limit: int = 5) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(f"'{x}'" for x in items[:limit]) + more


def _unique_slugs(classes: Sequence[str]) -> tuple[str, ...]:
    """Slugs for each class; a collision ("a/b" and "a b") gets a numeric suffix, in order."""
    out: list[str] = []
    used: set[str] = set()
    for c in classes:
        base = slugify(c)
        slug, k = base, 2
        while slug in used:
            slug, k = f"{base[:SLUG_MAX_BYTES - len(str(k)) - 1]}_{k}", k + 1
        used.add(slug)
        out.append(slug)
    return tuple(out)


# Fashion-MNIST's classes in label order (Xiao, Rasul & Vollgraf, 2017; zalandoresearch/fashion-mnist README).
FASHION_MNIST = LabelSpace(
    name="fashion_mnist",
    classes=(
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
)

BUILTIN_SPACES = {"fashion_mnist": FASHION_MNIST}
# Bundled label spaces read on first use (synclone/data/labelspaces/<name>.json).
BUNDLED_SPACES = ("imagenet1k",)


def get_label_space(name_or_path: str) -> LabelSpace:
    """A built-in label space by name, or one read from a JSON file (``{"classes": [...]}``) or text file."""
    if name_or_path in BUILTIN_SPACES:
        return BUILTIN_SPACES[name_or_path]
    if name_or_path in BUNDLED_SPACES:
        return LabelSpace.from_dict(read_data_file(f"labelspaces/{name_or_path}.json"))
    from pathlib import Path

    p = Path(name_or_path)
    if p.is_file():
        text = p.read_text(encoding="utf-8")
        if p.suffix == ".json":
            return LabelSpace.from_dict(json.loads(text))
        return LabelSpace(name=p.stem, classes=tuple(line.strip() for line in text.splitlines() if line.strip()))
    if p.suffix in (".txt", ".json") or "/" in name_or_path:
        raise UserError(f"label file '{name_or_path}' does not exist (a .txt file with one class name per line, or "
                        "a .json file with a 'classes' list)")
    raise UserError(
        f"unknown label space '{name_or_path}': use one of {sorted([*BUILTIN_SPACES, *BUNDLED_SPACES])} or a "
        ".json/.txt file of class names"
    )


@cache
def read_data_file(relpath: str) -> dict:
    """A JSON table bundled under ``synclone/data/`` (e.g. ``"labelspaces/imagenet16.json"``).

    Every bundled table (label spaces, class mappings, FOCUS contexts) is read through here.
    """
    node = resources.files("synclone") / "data"
    for part in relpath.split("/"):
        node = node / part
    try:
        return json.loads(node.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"bundled data file 'synclone/data/{relpath}' is missing; reinstall synclone") from None


@cache
def imagenet1k_space() -> LabelSpace:
    """The ImageNet-1k label space (ILSVRC-2012 index order), read from ``data/labelspaces/imagenet1k.json``."""
    return get_label_space("imagenet1k")


def class_lookup(space: LabelSpace) -> dict[str, int]:
    """Every class name, slug and lower-cased name of ``space`` -> its index (to read folder names)."""
    out: dict[str, int] = {}
    for i, (name, slug) in enumerate(zip(space.classes, space.slugs, strict=True)):
        for key in (name, slug, name.lower()):
            out.setdefault(key, i)
    return out
