"""Dataset diagnostics: how a synthetic dataset differs from the real data, per class and overall.

:func:`inspect_dataset` (``synclone inspect DATASET --reference REAL --features ...``) measures fidelity and
diversity in a feature space (Fréchet distance, KID, improved precision / recall, density / coverage),
intra-class diversity, near duplicates, classifiability and class confusion, the curation funnel, and the
real images no synthetic image covers; it writes a long table, CSVs and picture grids that the report reads.
The metric functions are in :mod:`synclone.inspect.metrics`, the extractors and their cache in
:mod:`synclone.inspect.features`.
"""

from synclone.inspect.features import FeatureCache, create_extractor
from synclone.inspect.metrics import (
    frechet_distance,
    kernel_inception_distance,
    mean_pairwise_distance,
    nearest_neighbour_distances,
    prdc,
)
from synclone.inspect.run import InspectConfig, inspect_dataset

__all__ = ["FeatureCache", "InspectConfig", "create_extractor", "frechet_distance", "inspect_dataset",
           "kernel_inception_distance", "mean_pairwise_distance", "nearest_neighbour_distances", "prdc"]
