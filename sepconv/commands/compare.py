"""``sepconv compare``: train a network and its separable twin the same way and report them side by side.

With no options: scikit-learn's bundled 8x8 digits and the small ``digits_cnn`` (about a minute on 2 CPU
cores). The report in --out (default runs/<timestamp>; a new or empty folder, the run to --resume, or with
--force a folder whose other files are left alone): report.html (self-contained) and report.md with a
side-by-side table (parameters, MACs, measured inference times as trained and optimised for inference, training-step
times, final and best validation accuracy, train-validation gap, wall time per epoch), the theoretical vs realised
speed-ups, the optimised copies in fp32 and bf16 side by side (time, validation accuracy, top-1 agreement, largest
logit error; bf16 where the CPU has AVX512-BF16 or AMX, else said not measured) and each layer's measured time
against its roofline; PNG plots (accuracy and loss per epoch, per-layer
costs and times, learned filters); metrics.json with every figure; checkpoints
of every epoch (--resume continues an interrupted run). Under ``torchrun --nproc_per_node=N`` it trains with
DistributedDataParallel (--batch-size is per process) and only rank 0 writes. A twin whose loss becomes nan or inf
stops at that epoch and is reported as diverged.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from .._extras import MissingExtra
from .._io import WriteError
from ..experiment import (DEFAULT_MODELS, CheckpointMismatch, ComparisonError, ComparisonSettings, DataError,
                          EEGOptions, check_dataset_name, run_comparison)
from ..experiment.eeg import PARADIGMS
from ._args import at_least, number_in

DEFAULTS = ComparisonSettings(out=Path("runs"))
INTERRUPTED_EXIT_CODE = 130  # the shell's code for a command ended by Ctrl-C (128 + SIGINT)
# Ranges of the numeric options: wide enough for any run, even a diverging one, narrow enough that nothing
# overflows: a seed feeds torch.manual_seed and numpy; Adam's first step divides the learning rate by 1 - beta1 = 0.1
# and hands it to PyTorch as a float32 scalar, which overflows above about 3.4e37.
MAX_EPOCHS = 100_000
MAX_BATCH_SIZE = 2**20
MAX_LEARNING_RATE = 1e36
MAX_SEED = 2**32 - 1
MAX_THREADS = 1024
MAX_FREQUENCY = 100_000  # Hz, for --fmin, --fmax and --resample: far above any EEG recording's sampling rate


def _folder(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must name a folder; got {text!r}")
    return Path(text)


_frequency = number_in(0, MAX_FREQUENCY)


def _dataset(text: str) -> str:
    try:
        return check_dataset_name(text)
    except DataError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("--dataset ")) from None


def _subjects(text: str) -> tuple[int, ...]:
    try:
        subjects = tuple(int(part) for part in text.split(","))
    except ValueError:
        subjects = ()
    if not subjects or min(subjects) < 1:
        raise argparse.ArgumentTypeError(f"must be subject numbers >= 1 separated by commas, like 1,2,3; got {text!r}")
    return subjects


def _error(message: str) -> int:
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one message rather than one per process
        print(f"sepconv compare: error: {message}", file=sys.stderr)
    return 2


def compare_command(args) -> int:
    if args.resume and args.out is None:
        return _error("--resume needs --out DIR, the folder of the run to continue")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = args.out if args.out is not None else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    settings = ComparisonSettings(out=out, model=args.model, dataset=args.dataset, data_dir=args.data_dir,
                                  epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
                                  seed=args.seed, resume=args.resume, force=args.force,
                                  eeg_options=EEGOptions(args.subjects, args.paradigm, args.fmin, args.fmax,
                                                         args.resample))
    try:
        run_comparison(settings)
    except (ComparisonError, DataError, CheckpointMismatch, MissingExtra) as error:
        return _error(str(error))
    except WriteError as error:  # e.g. a full disk: the checkpoints of the completed epochs are intact
        _error(str(error))
        return 1
    except KeyboardInterrupt:
        return INTERRUPTED_EXIT_CODE
    return 0


def add_parser(commands) -> None:
    parser = commands.add_parser("compare", help="train a network and its separable twin; report them side by side",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = ", ".join(f"{dataset}: {model}" for dataset, model in DEFAULT_MODELS.items())
    parser.add_argument("--model", help=f"a registered model with a separable twin (default per dataset: {defaults})")
    parser.add_argument("--dataset", type=_dataset, default=DEFAULTS.dataset,
                        help="digits (bundled with scikit-learn, the default), cifar10 (downloaded once into "
                             "$SEPCONV_DATA or the user cache folder, or the python batches in --data-dir), "
                             "eeg-synthetic (generated), eeg-numpy (X.npy and y.npy in --data-dir), eeg-mne (MNE "
                             "*-epo.fif files in --data-dir), video-synthetic (generated clips), moabb:NAME (a MOABB data set, e.g. moabb:BNCI2014_001; "
                             "MOABB downloads it); eeg-mne and moabb need sepconv[eeg]")
    parser.add_argument("--data-dir", type=Path, help="folder of cifar10's cifar-10-batches-py (instead of the "
                        "download), eeg-numpy's arrays or eeg-mne's epochs files")
    parser.add_argument("--epochs", type=at_least(1, MAX_EPOCHS), default=DEFAULTS.epochs,
                        help=f"epochs per twin (default {DEFAULTS.epochs})")
    parser.add_argument("--batch-size", type=at_least(1, MAX_BATCH_SIZE), default=DEFAULTS.batch_size,
                        help=f"inputs per step and process (default {DEFAULTS.batch_size})")
    parser.add_argument("--lr", type=number_in(0, MAX_LEARNING_RATE), default=DEFAULTS.learning_rate,
                        help=f"Adam's learning rate (default {DEFAULTS.learning_rate:g})")
    parser.add_argument("--seed", type=at_least(0, MAX_SEED), default=DEFAULTS.seed,
                        help=f"initialisation, data split and order, dropout (default {DEFAULTS.seed})")
    parser.add_argument("--out", type=_folder, help="folder of the report and checkpoints (default "
                        "runs/<timestamp>); new or empty unless --resume or --force")
    parser.add_argument("--threads", type=at_least(1, MAX_THREADS), help="PyTorch's intra-op threads for training and "
                        "timing (default: PyTorch's own choice, one per core)")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out (its other files are left "
                        "alone; a comparison there is started again)")
    eeg = parser.add_argument_group("MOABB (--dataset moabb:NAME)", "default: the paradigm's own setting")
    eeg.add_argument("--subjects", type=_subjects, help="subjects to load, like 1,2,3 (default: all)")
    eeg.add_argument("--paradigm", choices=PARADIGMS, help="how trials are cut and labelled (default: the data "
                     "set's own: motor-imagery, p300 or ssvep)")
    eeg.add_argument("--fmin", type=_frequency, help="band-pass low edge (Hz)")
    eeg.add_argument("--fmax", type=_frequency, help="band-pass high edge (Hz)")
    eeg.add_argument("--resample", type=_frequency, help="sampling rate to resample to (Hz)")
    parser.set_defaults(handler=compare_command)

