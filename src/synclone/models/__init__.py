"""Models: timm architectures by name (plus small CNNs registered into timm), with normalisation inside."""

from synclone.models.classifier import Classifier, create_classifier
from synclone.models.io import load_model, save_model

__all__ = ["Classifier", "create_classifier", "load_model", "save_model"]
