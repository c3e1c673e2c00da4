"""Optional dependencies, imported only where a feature needs them.

``pip install sepconv`` brings torch and numpy alone: layers, functional ops, geometry, the cost model,
decomposition, reference models and profiling. Plots, training (``sepconv compare``, ``sepconv.distill``)
and the datasets come with ``sepconv[experiment]``; real EEG through MNE and MOABB with ``sepconv[eeg]``;
``sepconv bench``'s runtime candidates (ONNX Runtime, OpenVINO), progress bar and chart with ``sepconv[bench]``.
A feature whose extra is missing raises :class:`MissingExtra`, one line naming the extra to install.
"""

from __future__ import annotations

import importlib

PACKAGES = {"sklearn": "scikit-learn"}  # import name -> the distribution pip installs, where they differ


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message is one line naming the extra that installs it."""


def require(module: str, extra: str, feature: str):
    """Import and return ``module``, or raise :class:`MissingExtra`: ``feature`` needs it, ``sepconv[extra]``
    installs it. An installed package that fails to import for another reason raises its own error."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        top = module.partition(".")[0]
        if error.name is not None and error.name.partition(".")[0] != top:
            raise  # the package is there but one of its own imports failed: that error says more
        package = PACKAGES.get(top, top)
        raise MissingExtra(f"{feature} needs {package}, which is not installed: pip install 'sepconv[{extra}]'") \
            from None
