"""Built-in probes; importing this package registers them with :mod:`synclone.evaluate.base`."""

from synclone.evaluate.probes import bias, core, perturb  # noqa: F401
