"""FOCUS's released annotations (``annotations.db``, SQLite) as a context-probe table.

FOCUS (Kattakinda & Feizi, ICML 2022) ships its images with one SQLite file whose table
``annotations`` has the columns ``file_name`` (the image's path under the dataset root, written with a
leading ``/``), ``category`` (truck, car, plane, ship, cat, dog, horse, deer, frog, bird), ``time``
(day, night, none), ``weather`` (cloudy, foggy, partly cloudy, raining, snowing, sunny, none),
``locations`` (the sorted locations joined by ", ": forest, grass, indoors, rocks, sand, street, snow,
water, none) and ``humans`` (yes/no), as the authors' ``BGVarDB`` writes it. :func:`read_focus_db`
returns it in the layout the context probe reads (``path``, ``class_name``, ``time``, ``weather``,
``locations``), so FOCUS's own table of uncommon settings judges every image.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pandas as pd

from synclone.errors import UserError

TABLE = "annotations"
COLUMNS = ("file_name", "category", "time", "weather", "locations")


def read_focus_db(path: str | Path, humans: str | None = None) -> pd.DataFrame:
    """Rows of FOCUS's ``annotations.db``; ``humans`` ('yes'/'no') keeps only images with/without people.

    The database is opened read-only; image paths are resolved against the database's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"FOCUS annotations '{path}' do not exist")
    try:
        con = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True)
    except sqlite3.Error as err:
        raise UserError(f"cannot open '{path}' as SQLite: {err}") from None
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        if TABLE not in tables:
            raise UserError(f"'{path}' has no table '{TABLE}' (tables: {', '.join(tables) or 'none'}); is it FOCUS's "
                            "annotations.db?")
        have = [r[1] for r in con.execute(f"PRAGMA table_info({TABLE})")]
        missing = [c for c in COLUMNS if c not in have]
        if missing:
            raise UserError(f"table '{TABLE}' of '{path}' lacks column(s) {', '.join(missing)}; it has "
                            f"{', '.join(have)}")
        cols = [*COLUMNS, *(["humans"] if "humans" in have else [])]
        df = pd.read_sql_query(f"SELECT {', '.join(cols)} FROM {TABLE} ORDER BY file_name", con)
    except sqlite3.DatabaseError as err:
        raise UserError(f"cannot read '{path}' as SQLite: {err}") from None
    finally:
        con.close()
    if humans is not None:
        if "humans" not in df.columns:
            raise UserError(f"'{path}' has no 'humans' column to filter on")
        df = df[df["humans"].astype(str).str.lower() == humans.lower()].reset_index(drop=True)
    if df.empty:
        raise UserError(f"FOCUS annotations '{path}' have no rows")
    root = path.parent
    out = pd.DataFrame({"path": [str(root / str(f).lstrip("/")) for f in df["file_name"]],
                        "file_name": df["file_name"].astype(str), "class_name": df["category"].astype(str),
                        "time": df["time"].astype(str), "weather": df["weather"].astype(str),
                        "locations": df["locations"].astype(str)})
    if "humans" in df.columns:
        out["humans"] = df["humans"].astype(str).to_numpy()
    return out
