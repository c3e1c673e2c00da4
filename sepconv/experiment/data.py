"""The datasets ``sepconv compare`` trains on, in memory, standardised, split into training and validation.

* ``digits`` (the default): scikit-learn's bundled handwritten digits, 1,797 8x8 grey images of 0-9, shipped
  inside the scikit-learn package, so nothing is downloaded. Validation: a stratified 20% chosen by the seed.
* ``cifar10``: the standard CIFAR-10 python batches (the ``cifar-10-batches-py`` folder): ``data_batch_1`` to
  ``data_batch_5`` for training, ``test_batch`` for validation (the usual protocol; no seed involved). Without
  ``--data-dir`` the official tarball is downloaded once into the cache (:mod:`~sepconv.experiment.download`),
  checked against its published MD5, and unpacked. Test hooks, for the tests only: ``SEPCONV_CIFAR10_URL`` and
  ``SEPCONV_CIFAR10_MD5`` replace the URL and the checksum (the tests serve a small tarball on 127.0.0.1).
* ``eeg-synthetic``: generated event-related EEG, documented in :func:`make_eeg_synthetic`. Synthetic: it
  shows how EEGNet and its twin learn a known spatial and temporal structure, not how they do on real EEG.
* ``eeg-numpy``: real epoched EEG from ``X.npy`` (trials x channels x samples) and ``y.npy`` (one label per
  trial) in ``--data-dir``. Validation: a stratified 20% chosen by the seed.
* ``eeg-mne`` (MNE epochs files in ``--data-dir``) and ``moabb:NAME`` (a MOABB data set, options in
  :class:`EEGOptions`): real EEG through MNE and MOABB, in :mod:`~sepconv.experiment.eeg` (``sepconv[eeg]``).
* ``video-synthetic``: generated clips of a texture drifting one of four ways, documented in
  :func:`make_video_synthetic`; for 3-D (video) networks such as X3D. Validation: a stratified 20% chosen by the seed.

An EEG dataset's :attr:`Dataset.details` say where it comes from: source, subjects, sessions, channels, sampling
rate and how validation was chosen; :meth:`Dataset.summary` adds the trials per class.

Inputs are standardised per channel with the training set's mean and standard deviation. Images are
``(N, C, H, W)``; EEG trials ``(N, 1, electrodes, samples)``, the layout EEGNet reads; clips ``(N, C, T, H, W)``.
"""

from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .._extras import require
from .._io import machine_memory_bytes

__all__ = ["DATASETS", "DEFAULT_MODELS", "DataError", "Dataset", "EEGOptions", "load_dataset", "default_model",
           "check_dataset_name", "make_eeg_synthetic", "eeg_synthetic_templates", "make_video_synthetic",
           "stratified_split"]

DATASETS = ("digits", "cifar10", "eeg-synthetic", "eeg-numpy", "eeg-mne", "video-synthetic", "moabb:NAME")
NEEDS_DATA_DIR = ("eeg-numpy", "eeg-mne")
READS_DATA_DIR = ("cifar10", *NEEDS_DATA_DIR)
DEFAULT_MODELS = {"digits": "digits_cnn", "cifar10": "vgg_cifar", "eeg-synthetic": "eegnet", "eeg-numpy": "eegnet",
                  "eeg-mne": "eegnet", "video-synthetic": "x3d_xs", "moabb:NAME": "eegnet"}
VALIDATION_FRACTION = 0.2


class DataError(ValueError):
    """Missing or malformed data; the message is one line that names the data and says what was expected."""


def check_dataset_name(name: str) -> str:
    """``name`` if it is one of :data:`DATASETS` (``moabb:`` followed by a MOABB data set's name), else DataError."""
    if name in DATASETS[:-1] or (name.startswith("moabb:") and len(name) > len("moabb:")):
        return name
    raise DataError(f"--dataset must be one of {', '.join(DATASETS)}; got {name!r}")


def default_model(name: str) -> str:
    """The model ``sepconv compare`` trains on dataset ``name`` unless told otherwise."""
    return DEFAULT_MODELS.get("moabb:NAME" if name.startswith("moabb:") else name, "")


@dataclass(frozen=True)
class EEGOptions:
    """How ``moabb:NAME`` loads its trials: MOABB's paradigm and its options; ``None`` takes the default."""

    subjects: tuple[int, ...] | None = None  # None: every subject of the data set
    paradigm: str | None = None  # None: the data set's own (see sepconv.experiment.eeg.PARADIGMS)
    fmin: float | None = None  # band-pass, Hz
    fmax: float | None = None
    resample: float | None = None  # Hz

    def command_words(self) -> list[str]:
        """The ``sepconv compare`` options that ask for these settings."""
        words = ["--subjects", ",".join(map(str, self.subjects))] if self.subjects is not None else []
        for flag, value in (("--paradigm", self.paradigm), ("--fmin", self.fmin), ("--fmax", self.fmax),
                            ("--resample", self.resample)):
            if value is not None:
                words += [flag, value if isinstance(value, str) else f"{value:g}"]
        return words


@dataclass(frozen=True)
class Dataset:
    """Standardised float32 tensors and what a model needs to know about them.

    Attributes:
        layout: ``"image"`` (inputs ``(N, C, H, W)``), ``"eeg"`` (``(N, 1, electrodes, samples)``) or ``"video"``
            (``(N, C, frames, H, W)``).
        details: what the report states about the data's origin (:func:`eeg_details` for EEG: source, subjects,
            sessions, channels, sampling rate, validation protocol; source and validation for generated video);
            empty for images.
    """

    name: str
    description: str
    train_inputs: torch.Tensor
    train_labels: torch.Tensor
    validation_inputs: torch.Tensor
    validation_labels: torch.Tensor
    class_names: tuple[str, ...]
    layout: str
    details: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, without the batch dimension."""
        return tuple(self.train_inputs.shape[1:])

    def model_arguments(self) -> dict:
        """The registry keyword arguments that size a model for these inputs."""
        if self.layout == "eeg":
            _, electrodes, samples = self.input_shape
            return {"num_classes": self.num_classes, "channels": electrodes, "samples": samples}
        if self.layout == "video":
            channels, frames, height, width = self.input_shape
            return {"num_classes": self.num_classes, "in_channels": channels, "num_frames": frames,
                    "input_size": (height, width)}
        channels, height, width = self.input_shape
        return {"num_classes": self.num_classes, "in_channels": channels, "input_size": (height, width)}

    def summary(self) -> dict:
        def per_class(labels):
            counts = torch.bincount(labels, minlength=self.num_classes).tolist()
            return dict(zip(self.class_names, counts))
        return {"name": self.name, "description": self.description, "input_shape": list(self.input_shape),
                "num_classes": self.num_classes, "class_names": list(self.class_names), "layout": self.layout,
                "train_size": len(self.train_labels), "validation_size": len(self.validation_labels),
                "per_class": {"train": per_class(self.train_labels), "validation": per_class(self.validation_labels)},
                "details": self.details}


def load_dataset(name: str, data_dir=None, seed: int = 0, eeg_options: EEGOptions = EEGOptions()) -> Dataset:
    """The dataset ``name`` (one of :data:`DATASETS`); ``data_dir`` for the datasets of :data:`READS_DATA_DIR` only
    (``cifar10`` downloads without it); ``eeg_options`` for ``moabb:NAME`` only."""
    check_dataset_name(name)
    if eeg_options != EEGOptions() and not name.startswith("moabb:"):
        raise DataError(f"--subjects, --paradigm, --fmin, --fmax and --resample are for --dataset moabb:NAME; got "
                        f"{' '.join(eeg_options.command_words())} with --dataset {name}")
    if data_dir is None and name in NEEDS_DATA_DIR:
        raise DataError(f"--dataset {name} needs --data-dir PATH (where its files are)")
    if data_dir is not None and name not in READS_DATA_DIR:
        raise DataError(f"--dataset {name} reads no --data-dir (got {str(data_dir)!r}); only "
                        f"{', '.join(READS_DATA_DIR)} do")
    if name == "digits":
        return _load_digits(seed)
    if name == "cifar10":
        return _load_cifar10(None if data_dir is None else Path(data_dir))
    if name == "eeg-synthetic":
        inputs, labels = make_eeg_synthetic(seed)
        details = eeg_details(f"generated by sepconv.experiment.data.make_eeg_synthetic (seed {seed})",
                              "none (synthetic)", "none (synthetic)", EEG_GRID ** 2, EEG_SAMPLING_RATE,
                              STRATIFIED_VALIDATION)
        return split_dataset("eeg-synthetic", make_eeg_synthetic.__doc__.split("\n\n")[0], inputs[:, None], labels,
                             [f"class {k}" for k in range(EEG_CLASSES)], *stratified_split(labels, seed), "eeg",
                             details)
    if name == "eeg-numpy":
        return _load_eeg_numpy(Path(data_dir), seed)
    if name == "video-synthetic":
        clips, labels = make_video_synthetic(seed)
        details = {"source": f"generated by sepconv.experiment.data.make_video_synthetic (seed {seed})",
                   "validation": STRATIFIED_VALIDATION}
        description = make_video_synthetic.__doc__.split("\n\n")[0].rstrip(".")  # the report adds the full stop
        return split_dataset("video-synthetic", description, clips, labels, VIDEO_CLASSES,
                             *stratified_split(labels, seed), "video", details)
    from . import eeg  # needs sepconv[eeg]; it says so if MNE or MOABB is missing

    if name == "eeg-mne":
        return eeg.load_eeg_mne(Path(data_dir), seed)
    return eeg.load_moabb(name, eeg_options, seed)


# --- splitting and standardisation ----------------------------------------------------------------

def stratified_split(labels: np.ndarray, seed: int, validation_fraction: float = VALIDATION_FRACTION):
    """Training and validation indices: ``validation_fraction`` of each class (at least one), chosen by ``seed``."""
    generator = np.random.default_rng(seed)
    train, validation = [], []
    for label in np.unique(labels):
        members = generator.permutation(np.flatnonzero(labels == label))
        count = max(1, round(validation_fraction * len(members)))
        validation.append(members[:count])
        train.append(members[count:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(validation))


def _standardised(train: np.ndarray, validation: np.ndarray, channel_axis: int):
    """Both arrays as float32 tensors, standardised per channel with the training set's statistics."""
    axes = tuple(axis for axis in range(train.ndim) if axis != channel_axis)
    mean = train.mean(axis=axes, keepdims=True, dtype=np.float64)
    std = train.std(axis=axes, keepdims=True, dtype=np.float64)
    std[std == 0] = 1.0  # a constant channel stays zero rather than dividing by zero

    def convert(array):
        return torch.from_numpy(((array - mean) / std).astype(np.float32))
    return convert(train), convert(validation)


def split_dataset(name: str, description: str, inputs: np.ndarray, labels: np.ndarray, class_names,
                  train: np.ndarray, validation: np.ndarray, layout: str, details: dict | None = None) -> Dataset:
    """Inputs ``(N, C, H, W)`` (images), ``(N, 1, electrodes, samples)`` (EEG) or ``(N, C, T, H, W)`` (video) split
    into the ``train`` and ``validation`` indices, standardised per channel or electrode with the training set's
    statistics."""
    channel_axis = 2 if layout == "eeg" else 1
    train_inputs, validation_inputs = _standardised(inputs[train], inputs[validation], channel_axis)
    return Dataset(name, description, train_inputs, torch.from_numpy(labels[train]), validation_inputs,
                   torch.from_numpy(labels[validation]), tuple(class_names), layout, details or {})


def class_indices(labels: np.ndarray, source: str) -> tuple[list[str], np.ndarray]:
    """The class names (sorted) and each trial's class index; DataError naming ``source`` unless there are at
    least 2 classes of at least 2 trials each (one for training, one for validation)."""
    classes, indices, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if len(classes) < 2 or counts.min() < 2:
        raise DataError(f"{source}: needs at least 2 classes of at least 2 trials each (one for training, one for "
                        f"validation); got counts {dict(zip(map(str, classes), counts.tolist()))}")
    return [str(c) for c in classes], indices.astype(np.int64)


STRATIFIED_VALIDATION = "stratified 20% chosen by the seed"
NOT_RECORDED = "not recorded"


def eeg_details(source: str, subjects, sessions, channels, sampling_rate: float | None, validation: str) -> dict:
    """What a report states about an EEG dataset. ``subjects``/``sessions``: lists or a sentence; ``channels``: the
    names, or their number where the data do not name them; ``sampling_rate`` in Hz (``None``: not recorded)."""
    return {"source": source, "subjects": subjects, "sessions": sessions, "channels": channels,
            "sampling rate (Hz)": NOT_RECORDED if sampling_rate is None else sampling_rate, "validation": validation}


# --- digits ---------------------------------------------------------------------------------------

def _load_digits(seed: int) -> Dataset:
    digits = require("sklearn.datasets", "experiment", "--dataset digits").load_digits()
    images = digits.images.astype(np.float32)[:, None]  # (1797, 1, 8, 8), grey levels 0-16
    labels = digits.target.astype(np.int64)
    return split_dataset("digits", "scikit-learn's handwritten digits: 1,797 8x8 grey images of the digits 0-9",
                         images, labels, [str(d) for d in digits.target_names], *stratified_split(labels, seed),
                         "image")


# --- CIFAR-10 -------------------------------------------------------------------------------------

CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_FILES = (*CIFAR_TRAIN_FILES, "test_batch", "batches.meta")
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"  # published on https://www.cs.toronto.edu/~kriz/cifar.html
CIFAR_MAX_FILE_BYTES = 64 * 2**20  # the real batches are 31 MB each
CIFAR_IMAGE_VALUES = 3 * 32 * 32
CIFAR_IMAGES_PER_BATCH = 10_000
CIFAR_MAX_ARRAY_BYTES = CIFAR_IMAGES_PER_BATCH * CIFAR_IMAGE_VALUES  # a batch's uint8 images, the largest array
# What CIFAR's pickles may construct: numpy arrays (as numpy 1 and 2 pickle them) and the bytes codec. Anything
# else would run code that is not part of the format, so loading refuses it.
_CIFAR_PICKLE_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
                         ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                         ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}


def _check_array_request(shape, dtype) -> int:
    """Refuse, before numpy allocates it, an array larger than a CIFAR-10 batch's images (a small pickle can ask
    for gigabytes: the array constructors allocate what the shape says, whatever the file holds)."""
    dims = (shape,) if isinstance(shape, int) else shape
    if not (isinstance(dims, tuple) and all(isinstance(n, int) and n >= 0 for n in dims)):
        raise pickle.UnpicklingError(f"it asks for an array of shape {shape!r}")
    try:
        itemsize = np.dtype(dtype).itemsize
    except TypeError:
        raise pickle.UnpicklingError(f"it asks for an array of dtype {dtype!r}") from None
    size = math.prod(dims) * itemsize
    if size > CIFAR_MAX_ARRAY_BYTES:
        raise pickle.UnpicklingError(f"it asks for an array of shape {dims} and dtype {np.dtype(dtype)} ({size:,} "
                                     f"bytes), more than a batch's {CIFAR_IMAGES_PER_BATCH:,} x {CIFAR_IMAGE_VALUES:,} "
                                     "uint8 images")
    return size


class _CheckedArray(np.ndarray):
    """An array a CIFAR pickle builds: its BUILD (``__setstate__``) must fill it with exactly the bytes its shape
    needs, and no Python objects (numpy's own ``__setstate__`` trusts the state, and can crash on a hostile one)."""

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) in (4, 5)):
            raise pickle.UnpicklingError("it builds an array from a state numpy does not write")
        shape, dtype, _, raw = state[-4:]
        size = _check_array_request(shape, dtype)
        if np.dtype(dtype).hasobject or not isinstance(raw, bytes) or len(raw) != size:
            raise pickle.UnpicklingError(f"it builds an array of shape {shape} and dtype {dtype} from other data")
        super().__setstate__(state)


def _bounded_ndarray(shape, dtype=float):
    """``numpy.ndarray`` as CIFAR's pickles may call it: bounded; also the marker of the class in _reconstruct."""
    _check_array_request(shape, dtype)
    return _CheckedArray(shape, dtype)


def _bounded_reconstruct(subtype, shape, dtype):
    """numpy's ``_reconstruct`` (an empty array its BUILD then fills from the pickle's bytes), bounded."""
    if subtype is not _bounded_ndarray:
        raise pickle.UnpicklingError(f"it reconstructs a {subtype!r}, not a numpy array")
    return _bounded_ndarray(shape, dtype)


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _CIFAR_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which CIFAR-10 batches do not use")
        if name == "ndarray":
            return _bounded_ndarray
        if name == "_reconstruct":
            return _bounded_reconstruct
        return super().find_class(module, name)


def _cifar_error(data_dir: Path, problem: str) -> DataError:
    return DataError(f"--data-dir {data_dir}: {problem}; CIFAR-10 needs the {CIFAR_FOLDER} folder of {CIFAR_URL} "
                     f"with exactly these files: {', '.join(CIFAR_FILES)}")


def _read_cifar_file(data_dir: Path, name: str) -> dict:
    path = data_dir / name
    size = path.stat().st_size
    if not 0 < size <= CIFAR_MAX_FILE_BYTES:
        raise _cifar_error(data_dir, f"{name} has {size:,} bytes, not a CIFAR-10 file (at most "
                                     f"{CIFAR_MAX_FILE_BYTES:,})")
    try:
        with open(path, "rb") as handle:
            content = _CifarUnpickler(handle, encoding="bytes").load()
    except Exception as error:  # any failure to unpickle means the same thing: not a CIFAR-10 file
        raise _cifar_error(data_dir, f"{name} is not a CIFAR-10 python pickle ({type(error).__name__}: {error})") \
            from None
    if not isinstance(content, dict):
        raise _cifar_error(data_dir, f"{name} holds a {type(content).__name__}, not a dict")
    return content


def _read_cifar_batch(data_dir: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    content = _read_cifar_file(data_dir, name)
    data, labels = content.get(b"data"), content.get(b"labels")
    data = np.asarray(data) if isinstance(data, np.ndarray) else data  # a plain array, not the _CheckedArray
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == CIFAR_IMAGE_VALUES):
        raise _cifar_error(data_dir, f"{name} has no b'data' array of uint8 with {CIFAR_IMAGE_VALUES} values per "
                                     "image")
    labels = np.asarray(labels if labels is not None else [], dtype=np.int64)
    if labels.shape != (len(data),) or labels.size and not (labels.min() >= 0 and labels.max() <= 9):
        raise _cifar_error(data_dir, f"{name} needs b'labels' with one class 0-9 per image ({len(data)} images)")
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar10(data_dir: Path | None) -> Dataset:
    if data_dir is None:
        from .download import fetch_and_unpack

        url = os.environ.get("SEPCONV_CIFAR10_URL", CIFAR_URL)  # test hooks: see the module's docstring
        data_dir = fetch_and_unpack(url, os.environ.get("SEPCONV_CIFAR10_MD5", CIFAR_MD5), CIFAR_FOLDER)
        source = f"{url} (MD5 verified), cached in {data_dir}"
    else:
        source = str(data_dir)
    if (data_dir / CIFAR_FOLDER).is_dir():  # the folder the archive unpacks into, given its parent
        data_dir = data_dir / CIFAR_FOLDER
    if not data_dir.is_dir():
        raise _cifar_error(data_dir, "no such directory")
    missing = [name for name in CIFAR_FILES if not (data_dir / name).is_file()]
    if missing:
        raise _cifar_error(data_dir, f"missing {', '.join(missing)}")
    names = _read_cifar_file(data_dir, "batches.meta").get(b"label_names")
    if not (isinstance(names, list) and len(names) == 10 and all(isinstance(n, bytes) for n in names)):
        raise _cifar_error(data_dir, "batches.meta has no b'label_names' list of the 10 class names")
    train = [_read_cifar_batch(data_dir, name) for name in CIFAR_TRAIN_FILES]
    test_images, test_labels = _read_cifar_batch(data_dir, "test_batch")
    train_images = np.concatenate([images for images, _ in train])
    train_labels = np.concatenate([labels for _, labels in train])
    train_inputs, validation_inputs = _standardised(train_images.astype(np.float32), test_images.astype(np.float32),
                                                    channel_axis=1)
    return Dataset("cifar10", f"CIFAR-10 from {source}: 32x32 colour images of 10 classes; validation is "
                   "test_batch", train_inputs, torch.from_numpy(train_labels), validation_inputs,
                   torch.from_numpy(test_labels), tuple(n.decode() for n in names), "image")


# --- synthetic EEG --------------------------------------------------------------------------------

EEG_SAMPLING_RATE = 128  # Hz
EEG_SAMPLES = 128  # one-second trials
EEG_GRID = 4  # electrodes on a 4 x 4 grid over the scalp
EEG_CLASSES = 4
EEG_TRIALS_PER_CLASS = 200
# Class k: a spatial blob centred at EEG_CENTRES[k] (grid coordinates in [-1, 1]) and a temporal waveform
# peaking at EEG_LATENCIES[k] seconds, oscillating at EEG_FREQUENCIES[k] Hz under a Gaussian envelope.
EEG_CENTRES = ((-0.5, -0.5), (0.5, -0.5), (-0.5, 0.5), (0.5, 0.5))
EEG_LATENCIES = (0.30, 0.40, 0.35, 0.45)
EEG_FREQUENCIES = (4.0, 6.0, 8.0, 10.0)
EEG_SPATIAL_WIDTH = 0.6
EEG_ENVELOPE_WIDTH = 0.08  # seconds
EEG_LATENCY_JITTER = 0.03  # seconds, standard deviation per trial
EEG_BACKGROUND_SOURCES = 8


def eeg_synthetic_templates(latency_shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The known structure of ``eeg-synthetic``: spatial patterns ``(classes, electrodes)`` (unit norm) and
    temporal waveforms ``(classes, samples)`` (peak 1), all waveforms delayed by ``latency_shift`` seconds."""
    axis = np.linspace(-1.0, 1.0, EEG_GRID)
    rows, columns = np.meshgrid(axis, axis, indexing="ij")
    spatial = np.stack([np.exp(-((rows - y) ** 2 + (columns - x) ** 2) / (2 * EEG_SPATIAL_WIDTH ** 2)).ravel()
                        for x, y in EEG_CENTRES])
    spatial /= np.linalg.norm(spatial, axis=1, keepdims=True)
    time = np.arange(EEG_SAMPLES) / EEG_SAMPLING_RATE
    delay = time[None, :] - (np.asarray(EEG_LATENCIES)[:, None] + latency_shift)
    temporal = (np.exp(-delay ** 2 / (2 * EEG_ENVELOPE_WIDTH ** 2))
                * np.cos(2 * np.pi * np.asarray(EEG_FREQUENCIES)[:, None] * delay))
    return spatial, temporal


def make_eeg_synthetic(seed: int = 0, trials_per_class: int = EEG_TRIALS_PER_CLASS, signal_to_noise: float = 0.5):
    """Synthetic event-related EEG: 4 classes, 16 electrodes (a 4x4 grid), 1-second trials at 128 Hz.

    Each trial of class ``k`` is ``a * outer(spatial[k], temporal[k] delayed by d) + background + sensor noise``
    (:func:`eeg_synthetic_templates`): a blob over one quadrant of the grid times a Gabor-like waveform
    (4, 6, 8 or 10 Hz under a Gaussian envelope peaking at 300-450 ms); per trial an amplitude ``a``
    (log-normal around 1) and a latency jitter ``d`` (30 ms standard deviation). The background is
    brain-like: 8 latent sources of smoothed (AR(1), coefficient 0.95) noise mixed onto the electrodes by a
    random matrix, plus white sensor noise; ``signal_to_noise`` is the ratio of the signal's RMS over its
    trial to the background's. Only the noise, amplitudes, jitter and class order depend on ``seed``; the
    patterns and waveforms are fixed.

    Returns ``(trials, labels)``: float32 ``(N, 16, 128)`` and int64 ``(N,)``.
    """
    generator = np.random.default_rng(seed)
    count = EEG_CLASSES * trials_per_class
    labels = generator.permutation(np.repeat(np.arange(EEG_CLASSES), trials_per_class))
    jitter = generator.normal(0.0, EEG_LATENCY_JITTER, count)
    amplitude = generator.lognormal(0.0, 0.25, count)
    signal = np.empty((count, EEG_GRID ** 2, EEG_SAMPLES))
    for trial, (label, delay) in enumerate(zip(labels, jitter)):
        spatial, temporal = eeg_synthetic_templates(delay)
        signal[trial] = amplitude[trial] * np.outer(spatial[label], temporal[label])

    sources = generator.normal(size=(count, EEG_BACKGROUND_SOURCES, EEG_SAMPLES))
    for t in range(1, EEG_SAMPLES):  # AR(1) smoothing: most background power at low frequencies, as in EEG
        sources[..., t] += 0.95 * sources[..., t - 1]
    mixing = generator.normal(size=(EEG_GRID ** 2, EEG_BACKGROUND_SOURCES))
    background = np.einsum("es,nst->net", mixing, sources)
    background += 0.5 * background.std() * generator.normal(size=background.shape)
    background *= np.sqrt((signal ** 2).mean()) / (signal_to_noise * background.std())
    return (signal + background).astype(np.float32), labels.astype(np.int64)


# --- synthetic video ------------------------------------------------------------------------------

VIDEO_CLASSES = ("right", "left", "down", "up")  # the direction of motion; "down" is towards the last row
VIDEO_DIRECTIONS = ((1.0, 0.0), (-1.0, 0.0), (0.0, 1.0), (0.0, -1.0))  # per class, (x, y) with y along the rows
VIDEO_FRAMES = 8
VIDEO_SIZE = 32  # pixels: X3D's stem and stages halve it to a 1x1 map
VIDEO_CLIPS_PER_CLASS = 200
VIDEO_GRAIN = 1.5  # pixels: the texture is white noise blurred by a Gaussian of this standard deviation
VIDEO_SPEEDS = (1.0, 2.0)  # pixels per frame, uniform per clip
VIDEO_ANGLE_JITTER = 15.0  # degrees each way from the class's direction, uniform per clip
VIDEO_NOISE = 0.5  # standard deviation of the white noise added to every frame; the texture's is 1


def make_video_synthetic(seed: int = 0, clips_per_class: int = VIDEO_CLIPS_PER_CLASS):
    """Synthetic video: 4 classes of colour clips, 8 frames of 32x32, in which a texture drifts right, left, down or up.

    Each clip is a random texture (per colour channel, white noise blurred by a Gaussian of 1.5 pixels, scaled
    to unit standard deviation) that moves as a whole, wrapping around the frame, in its class's direction
    (:data:`VIDEO_DIRECTIONS`, turned by up to 15 degrees either way) at 1 to 2 pixels per frame, shifted by
    whole and fractional pixels alike (exactly, by a phase shift of its Fourier transform), under white noise
    of standard deviation 0.5 drawn anew for every frame. Every frame of every class is the same kind of
    image: only the motion between frames tells the classes apart. Everything depends on ``seed``.

    Returns ``(clips, labels)``: float32 ``(N, 3, 8, 32, 32)`` (channels, frames, rows, columns) and int64
    ``(N,)``, indices into :data:`VIDEO_CLASSES`.
    """
    generator = np.random.default_rng(seed)
    count = len(VIDEO_CLASSES) * clips_per_class
    labels = generator.permutation(np.repeat(np.arange(len(VIDEO_CLASSES)), clips_per_class))
    directions = np.asarray(VIDEO_DIRECTIONS)[labels]
    angles = (np.arctan2(directions[:, 1], directions[:, 0])
              + np.deg2rad(generator.uniform(-VIDEO_ANGLE_JITTER, VIDEO_ANGLE_JITTER, count)))
    velocity = generator.uniform(*VIDEO_SPEEDS, count)[:, None] * np.stack([np.cos(angles), np.sin(angles)], 1)
    shifts = np.arange(VIDEO_FRAMES)[None, :, None] * velocity[:, None, :]  # (N, frames, (x, y)) in pixels

    frequencies = np.fft.fftfreq(VIDEO_SIZE)  # cycles per pixel
    rows, columns = frequencies[:, None], frequencies[None, :]
    blur = np.exp(-2 * (np.pi * VIDEO_GRAIN) ** 2 * (rows ** 2 + columns ** 2))  # a Gaussian's transform
    textures = (np.fft.fft2(generator.normal(size=(3, count, 1, VIDEO_SIZE, VIDEO_SIZE))) * blur).astype(np.complex64)
    # Moving by (x, y) multiplies the transform by exp(-2 pi i (x f_columns + y f_rows)): exact sub-pixel shifts.
    # Single precision and one channel at a time keep the memory to a few copies of the clips.
    cycles = (shifts[..., 0, None, None] * columns + shifts[..., 1, None, None] * rows).astype(np.float32)
    phases = np.exp(-2j * np.pi * cycles)  # (N, frames, size, size)
    clips = np.stack([np.fft.ifft2(channel * phases).real for channel in textures], 1)  # (N, 3, frames, size, size)
    clips /= clips[:, :, :1].std(axis=(3, 4), keepdims=True)
    clips += generator.normal(0.0, VIDEO_NOISE, clips.shape)
    return clips.astype(np.float32), labels.astype(np.int64)


# --- real EEG from numpy arrays -------------------------------------------------------------------

EEG_INPUT_KINDS = "iuf"  # X: integers or real floats (not complex, bool, strings or objects)
EEG_LABEL_KINDS = "iufbUS"  # y: integers, floats, booleans or strings


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset of a ``.npy`` file, from its header alone (nothing allocated)."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            raise ValueError(f"npy format version {version[0]}.{version[1]} (1.0 and 2.0 are read)")
        shape, _, dtype = readers[version](handle)
        return shape, dtype, handle.tell()


def _read_npy(data_dir: Path, name: str, kinds: str, expected: str) -> np.ndarray:
    """``name``.npy, after checking its header: a dtype of ``kinds``, and a size that the file holds and that
    fits in memory (with the float32 copy training makes)."""
    path = data_dir / f"{name}.npy"

    def problem(text: str) -> DataError:
        return DataError(f"--data-dir {data_dir}: {name}.npy {text}; eeg-numpy needs {expected}")
    try:
        shape, dtype, offset = _npy_header(path)
    except FileNotFoundError:
        raise DataError(f"--data-dir {data_dir}: no {name}.npy; eeg-numpy needs {expected}") from None
    except (ValueError, OSError, EOFError) as error:
        raise problem(f"is not a readable numpy array ({' '.join(str(error).split())})") from None
    if dtype.kind not in kinds:
        raise problem(f"holds {dtype} values; it must hold real numbers" + (" or labels" if "U" in kinds else ""))
    size, held = math.prod(shape) * dtype.itemsize, os.path.getsize(path) - offset
    if size != held:
        raise problem(f"claims shape {shape} of {dtype} ({size:,} bytes), but holds {held:,} bytes of data")
    if size + 4 * math.prod(shape) > machine_memory_bytes():
        raise problem(f"of shape {shape} needs {size / 2**30:,.1f} GiB and a float32 copy; this machine has "
                      f"{machine_memory_bytes() / 2**30:,.1f} GiB")
    return np.load(path, allow_pickle=False)  # never runs pickled code


def _load_eeg_numpy(data_dir: Path, seed: int) -> Dataset:
    expected = f"{data_dir}/X.npy (trials x channels x samples) and {data_dir}/y.npy (one label per trial)"
    if not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir}: no such directory; eeg-numpy needs {expected}")
    trials = _read_npy(data_dir, "X", EEG_INPUT_KINDS, expected)
    labels = _read_npy(data_dir, "y", EEG_LABEL_KINDS, expected)
    if trials.ndim != 3 or not np.isfinite(trials).all():
        raise DataError(f"--data-dir {data_dir}: X.npy must be finite numbers of shape (trials, channels, samples); "
                        f"got {trials.dtype} of shape {trials.shape}")
    if labels.shape != (len(trials),):
        raise DataError(f"--data-dir {data_dir}: y.npy must hold one label per trial, shape ({len(trials)},); got "
                        f"shape {labels.shape}")
    if labels.dtype.kind == "f" and not np.isfinite(labels).all():
        raise DataError(f"--data-dir {data_dir}: y.npy holds {int((~np.isfinite(labels)).sum())} labels that are nan "
                        "or inf; every trial needs a label")
    classes, indices = class_indices(labels, f"--data-dir {data_dir}: y.npy")
    details = eeg_details(f"{data_dir}/X.npy and y.npy", NOT_RECORDED, NOT_RECORDED, trials.shape[1], None,
                          STRATIFIED_VALIDATION)
    return split_dataset("eeg-numpy", f"epoched EEG from {data_dir}: {trials.shape[0]} trials of {trials.shape[1]} "
                         f"channels x {trials.shape[2]} samples", trials.astype(np.float32)[:, None], indices, classes,
                         *stratified_split(indices, seed), "eeg", details)
