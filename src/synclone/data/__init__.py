"""Real and synthetic image datasets as labelled tensors or files, with their label spaces."""

from synclone.data.fashion_mnist import load_fashion_mnist
from synclone.data.imageset import ImageSet, TensorImageSet

__all__ = ["ImageSet", "TensorImageSet", "load_fashion_mnist"]
