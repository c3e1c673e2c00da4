"""Real EEG through the field's own tools (the ``sepconv[eeg]`` extra: MNE and MOABB).

* ``eeg-mne``: every MNE epochs file (``*-epo.fif``, ``*_epo.fif``, optionally gzipped) in ``--data-dir``; a
  trial's label is the name its event has in the file's ``event_id``. The files must share channels, sampling
  rate and epoch length. Validation: a stratified 20% chosen by the seed.
* ``moabb:NAME``: MOABB's data set ``NAME`` (a class of ``moabb.datasets``, e.g. ``BNCI2014_001``, the BCI
  Competition IV 2a motor-imagery set EEGNet is validated on, or the generated ``FakeDataset``), epoched by a
  MOABB paradigm: the data set's own (motor imagery, P300 or SSVEP) or ``--paradigm``, with its band-pass
  (``--fmin``/``--fmax``) and resampling (``--resample``). MOABB downloads the files into MNE's data folder
  (``MNE_DATA``) on first use. Validation: the last session where the data set has several (the usual
  protocol: train on the earlier sessions), else a stratified 20% chosen by the seed.

Both use the data channels only (EEG, MEG, ...; not EOG or stimulus channels) and leave out bad channels. The
report states the source, subjects, sessions, channels, sampling rate and trials per class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .._extras import require
from .data import (NOT_RECORDED, STRATIFIED_VALIDATION, DataError, Dataset, EEGOptions, class_indices, eeg_details,
                   split_dataset, stratified_split)

__all__ = ["PARADIGMS", "load_eeg_mne", "load_moabb"]

PARADIGMS = {"motor-imagery": "MotorImagery", "left-right-imagery": "LeftRightImagery", "p300": "P300",
             "ssvep": "SSVEP"}  # --paradigm -> the moabb.paradigms class
DATASET_PARADIGMS = {"imagery": "motor-imagery", "p300": "p300", "ssvep": "ssvep"}  # a data set's own paradigm
EPOCHS_SUFFIXES = ("-epo.fif", "_epo.fif", "-epo.fif.gz", "_epo.fif.gz")


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


# --- MNE epochs files -----------------------------------------------------------------------------

def _read_epochs(mne, path: Path):
    try:
        epochs = mne.read_epochs(path, preload=True, verbose="error")
    except Exception as error:  # whatever MNE's reason, the file is not what eeg-mne reads
        raise DataError(f"--data-dir {path.parent}: {path.name} is not a readable MNE epochs file "
                        f"({_one_line(error)})") from None
    return epochs.pick("data", exclude="bads")


def load_eeg_mne(data_dir: Path, seed: int) -> Dataset:
    mne = require("mne", "eeg", "--dataset eeg-mne")
    if not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir}: no such directory; eeg-mne needs a folder of MNE epochs files "
                        "(*-epo.fif)")
    files = sorted(path for path in data_dir.iterdir() if path.name.endswith(EPOCHS_SUFFIXES))
    if not files:
        raise DataError(f"--data-dir {data_dir}: no MNE epochs files ({', '.join('*' + s for s in EPOCHS_SUFFIXES)})"
                        "; save them with mne.Epochs.save")
    trials, labels, subjects = [], [], set()
    first = None
    for path in files:
        epochs = _read_epochs(mne, path)
        layout = {"channels": epochs.ch_names, "sampling rate": epochs.info["sfreq"], "samples": len(epochs.times)}
        first = first or (path, layout)
        for key, value in layout.items():
            if value != first[1][key]:
                raise DataError(f"--data-dir {data_dir}: {path.name} has {key} {value}, {first[0].name} has "
                                f"{first[1][key]}; eeg-mne needs the same channels, sampling rate and epoch length "
                                "in every file")
        names = {code: name for name, code in epochs.event_id.items()}
        labels += [names[code] for code in epochs.events[:, 2]]
        trials.append(epochs.get_data())
        subject = epochs.info.get("subject_info") or {}
        subjects.add(str(subject.get("his_id") or subject.get("id") or NOT_RECORDED))
    trials = np.concatenate(trials)
    classes, indices = class_indices(np.asarray(labels), f"--data-dir {data_dir}: the epochs' events")
    channels, sampling_rate = first[1]["channels"], first[1]["sampling rate"]
    details = eeg_details(f"MNE epochs files in {data_dir}: {', '.join(path.name for path in files)}",
                          sorted(subjects), f"{NOT_RECORDED} (one recording per file)", channels, sampling_rate,
                          STRATIFIED_VALIDATION)
    return split_dataset("eeg-mne", f"MNE epochs from {data_dir}: {len(files)} file(s), {len(trials)} trials of "
                         f"{len(channels)} channels x {trials.shape[2]} samples at {sampling_rate:g} Hz",
                         trials.astype(np.float32)[:, None], indices, classes, *stratified_split(indices, seed),
                         "eeg", details)


# --- MOABB ----------------------------------------------------------------------------------------

def _moabb_dataset(moabb, code: str):
    from moabb.datasets.base import BaseDataset

    dataset_class = getattr(moabb.datasets, code, None)
    if not (isinstance(dataset_class, type) and issubclass(dataset_class, BaseDataset)):
        raise DataError(f"--dataset moabb:{code}: moabb.datasets has no data set {code!r} (e.g. BNCI2014_001, "
                        "FakeDataset)")
    return dataset_class()


def _paradigm(moabb, dataset, name: str, options: EEGOptions):
    own = DATASET_PARADIGMS.get(dataset.paradigm)
    paradigm_name = options.paradigm or own
    if paradigm_name is None:
        raise DataError(f"--dataset moabb:{dataset.__class__.__name__}: its paradigm {dataset.paradigm!r} has no "
                        f"loader here; choose --paradigm ({', '.join(PARADIGMS)})")
    arguments = {key: value for key, value in (("fmin", options.fmin), ("fmax", options.fmax),
                                               ("resample", options.resample)) if value is not None}
    try:
        paradigm = getattr(moabb.paradigms, PARADIGMS[paradigm_name])(**arguments)
    except (TypeError, ValueError) as error:
        raise DataError(f"--paradigm {paradigm_name}: {_one_line(error)}") from None
    if not paradigm.is_valid(dataset):
        raise DataError(f"--paradigm {paradigm_name} does not fit --dataset {name} (paradigm {dataset.paradigm!r}, "
                        f"events {', '.join(dataset.event_id)})")
    return paradigm_name, paradigm


def load_moabb(name: str, options: EEGOptions, seed: int) -> Dataset:
    """``name`` is ``moabb:CODE``."""
    require("mne", "eeg", f"--dataset {name}")
    moabb = require("moabb", "eeg", f"--dataset {name}")
    import moabb.datasets
    import moabb.paradigms

    dataset = _moabb_dataset(moabb, name.partition(":")[2])
    subjects = list(options.subjects) if options.subjects is not None else list(dataset.subject_list)
    unknown = sorted(set(subjects) - set(dataset.subject_list))
    if unknown:
        raise DataError(f"--subjects: {name} has no subject {', '.join(map(str, unknown))}; its subjects are "
                        f"{', '.join(map(str, dataset.subject_list))}")
    paradigm_name, paradigm = _paradigm(moabb, dataset, name, options)
    try:
        epochs, labels, metadata = paradigm.get_data(dataset, subjects=subjects, return_epochs=True)
    except Exception as error:  # a download, a file or MOABB itself: one line naming the data set
        raise DataError(f"--dataset {name}: MOABB could not load subjects {', '.join(map(str, subjects))} "
                        f"({_one_line(error)})") from None
    epochs.pick("data", exclude="bads")
    trials = epochs.get_data()
    classes, indices = class_indices(np.asarray(labels), f"--dataset {name}")
    sessions = sorted(metadata["session"].astype(str).unique())
    if len(sessions) > 1:  # the usual protocol: train on the earlier sessions, validate on the last
        last = (metadata["session"].astype(str) == sessions[-1]).to_numpy()
        train, validation = np.flatnonzero(~last), np.flatnonzero(last)
        protocol = f"by session: trained on {', '.join(sessions[:-1])}, validated on {sessions[-1]}"
    else:
        train, validation = stratified_split(indices, seed)
        protocol = f"{STRATIFIED_VALIDATION} (one session)"
    channels = epochs.ch_names
    sampling_rate = epochs.info["sfreq"]
    band = ", ".join(f"{low:g}-{high:g} Hz" for low, high in paradigm.filters)
    details = eeg_details(f"MOABB {dataset.__class__.__name__} (code {dataset.code}) through the {paradigm_name} "
                          f"paradigm (band-pass {band})",
                          sorted(int(s) for s in metadata["subject"].unique()), sessions, channels, sampling_rate,
                          protocol)
    return split_dataset(name, f"MOABB data set {dataset.__class__.__name__} ({paradigm_name}): {len(trials)} trials "
                         f"of {len(channels)} channels x {trials.shape[2]} samples at {sampling_rate:g} Hz",
                         trials.astype(np.float32)[:, None], indices, classes, train, validation, "eeg", details)
