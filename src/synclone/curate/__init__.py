"""Curation: score generated images with CLIP or a teacher, filter and de-duplicate them, write a curated set.

Entry point :func:`curate` (``synclone curate CONFIG``); readers :func:`read_dataset_folder`,
:func:`load_curated` and :func:`load_image_folder_tensors`; scorers in :mod:`synclone.curate.scorers`;
the filter functions in :mod:`synclone.curate.filters`; regenerate-until-full in :mod:`synclone.curate.refill`.
"""

from synclone.curate.config import CurateConfig, FiltersConfig, RefillConfig, ScorerConfig
from synclone.curate.refill import RefillIncomplete
from synclone.curate.run import curate
from synclone.curate.scorers import SCORERS, create_scorer, register_scorer
from synclone.data.folder import ImageRecord, load_curated, load_image_folder_tensors, read_dataset_folder

__all__ = ["SCORERS", "CurateConfig", "FiltersConfig", "ImageRecord", "RefillConfig", "RefillIncomplete",
           "ScorerConfig", "create_scorer", "curate", "load_curated", "load_image_folder_tensors",
           "read_dataset_folder", "register_scorer"]
