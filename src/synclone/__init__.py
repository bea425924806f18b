"""synclone: synthetic clones (classifiers trained on generated images) and the evidence of their robustness.

The command line (``synclone --help``) covers the whole workflow; the library exposes its pieces, e.g.
``synclone.load_model(folder)`` returns a model that takes pixels in [0, 1] and normalises inside.
"""

from synclone.models.io import load_model

__version__ = "0.1.0"
__all__ = ["__version__", "load_model"]
