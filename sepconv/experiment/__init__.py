"""The experiment behind ``sepconv compare``: a network and its separable twin, trained the same way, compared.

* :mod:`~sepconv.experiment.data` — the datasets (``digits``, ``cifar10``, ``eeg-synthetic``, ``eeg-numpy``,
  ``eeg-mne``, ``video-synthetic``, ``moabb:NAME``);
* :mod:`~sepconv.experiment.download` — archives downloaded once into a cache, verified, unpacked safely;
* :mod:`~sepconv.experiment.eeg` — real EEG through MNE (``eeg-mne``) and MOABB (``moabb:NAME``);
* :mod:`~sepconv.experiment.train` — the training loop: checkpoints, resume, ``torchrun`` (DDP);
* :mod:`~sepconv.experiment.measure` — counted costs and measured times;
* :mod:`~sepconv.experiment.plots` and :mod:`~sepconv.experiment.report` — the PNGs, ``metrics.json``,
  ``report.md`` and ``report.html``;
* :mod:`~sepconv.experiment.compare` — :func:`run_comparison`, which puts them together.
"""

from .compare import ComparisonError, ComparisonSettings, build_twins, run_comparison
from .data import DATASETS, DEFAULT_MODELS, DataError, Dataset, EEGOptions, check_dataset_name, load_dataset
from .train import CheckpointMismatch, Distributed, Trainer, TrainingSettings

__all__ = ["run_comparison", "ComparisonSettings", "ComparisonError", "build_twins", "DATASETS", "DEFAULT_MODELS",
           "DataError", "Dataset", "EEGOptions", "check_dataset_name", "load_dataset", "CheckpointMismatch",
           "Distributed", "Trainer", "TrainingSettings"]
