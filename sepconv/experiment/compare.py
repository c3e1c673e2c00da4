"""The comparison: a registered model and its separable twin, built and trained the same way, measured, reported.

:func:`run_comparison` checks everything that can be checked before it writes anything (the extras it needs; an
--out that is new, empty, the run to resume or allowed with --force, and writable; the data; that a batch fits in
memory; that both twins build and take the data's inputs; that a checkpoint to resume belongs to this run), then
trains the standard twin and the separable twin in turn (:class:`~sepconv.experiment.train.Trainer`), counts
their costs, times them (:mod:`~sepconv.experiment.measure`) and writes the report
(:mod:`~sepconv.experiment.report`); a twin whose loss becomes nan or inf stops there and is reported as diverged.
Ctrl-C stops it with the checkpoints of the completed epochs and a partial report (no times).
"""

from __future__ import annotations

import math
import platform
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .._extras import require
from .._io import check_writable, machine_memory_bytes
from ..models import create_model, list_models
from .data import Dataset, EEGOptions, default_model, load_dataset
from ..profiling.timing import measure_machine
from .measure import TIMING_METHOD, count_costs, machine_metrics, measure_times, native_bf16, profile_layers
from .report import (TWINS, bf16_lines, build_metrics, markdown_table, speedup_lines, summarize_history,
                     summary_table, write_report)
from .train import Distributed, Trainer, TrainingSettings, evaluation_batch_size

__all__ = ["ComparisonSettings", "ComparisonError", "run_comparison", "build_twins"]

OPTIMIZER = "Adam"
RUN_FILES = ("metrics.json", "checkpoints")  # what makes a folder hold a comparison already


class ComparisonError(ValueError):
    """A comparison that cannot start as asked (model, data and output folder); nothing has been written."""


@dataclass(frozen=True)
class ComparisonSettings:
    """What ``sepconv compare`` was asked to do; ``model=None`` takes the dataset's default model."""

    out: Path
    model: str | None = None
    dataset: str = "digits"
    data_dir: Path | None = None
    epochs: int = 15
    batch_size: int = 32
    learning_rate: float = 1e-3
    seed: int = 0
    resume: bool = False
    eeg_options: EEGOptions = EEGOptions()
    force: bool = False

    @property
    def model_name(self) -> str:
        return self.model or default_model(self.dataset)

    def command_line(self, resume: bool) -> str:
        """The ``sepconv compare`` command that runs this comparison (with ``--resume``: continues it)."""
        words = ["sepconv", "compare", "--model", self.model_name, "--dataset", self.dataset,
                 *self.eeg_options.command_words()]
        if self.data_dir is not None:
            words += ["--data-dir", str(self.data_dir)]
        words += ["--epochs", str(self.epochs), "--batch-size", str(self.batch_size), "--lr", f"{self.learning_rate:g}",
                  "--seed", str(self.seed), "--out", str(self.out)]
        return shlex.join(words + (["--resume"] if resume else []))

    def as_metrics(self) -> dict:
        values = asdict(self)
        del values["force"]
        values.update(model=self.model_name, out=str(self.out), optimizer=OPTIMIZER, loss="cross-entropy",
                      data_dir=None if self.data_dir is None else str(self.data_dir))
        return values


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def build_twins(name: str, dataset: Dataset, seed: int) -> dict[str, nn.Module]:
    """The standard and the separable twin of registered model ``name``, sized for ``dataset``, each built from
    the same seed, checked on two of its inputs; :class:`ComparisonError` if they cannot be built or do not fit."""
    if name not in list_models():
        raise ComparisonError(f"--model {name!r} is not a registered model; choose one of {', '.join(list_models())}")
    twins = {}
    for twin in TWINS:
        torch.manual_seed(seed)  # the same initialisation stream for both twins
        try:
            model = create_model(name, separable=twin == "separable", **dataset.model_arguments())
            with torch.no_grad():
                model.eval()(dataset.train_inputs[:2])
        except (TypeError, ValueError, RuntimeError) as error:
            shape = "x".join(map(str, dataset.input_shape))
            raise ComparisonError(f"--model {name} does not fit --dataset {dataset.name} (inputs {shape}, "
                                  f"{dataset.num_classes} classes): {_one_line(error)}") from None
        twins[twin] = model.train()
    return twins


def _check_out_dir(settings: ComparisonSettings) -> None:
    """--out must be new or empty, hold the run to --resume, or be allowed with --force; and be writable."""
    out = settings.out
    if out.exists() and not out.is_dir():
        raise ComparisonError(f"--out {out} is a file; it must be a folder (new, or the run to --resume)")
    holds_run = any((out / name).exists() for name in RUN_FILES)
    try:
        others = sorted(path.name for path in out.iterdir()) if out.is_dir() else []
    except OSError as error:
        raise ComparisonError(f"--out {out}: cannot list the folder ({error.strerror})") from None
    listing = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
    if settings.resume and others and not holds_run:
        raise ComparisonError(f"--out {out} holds no comparison to --resume (no {' or '.join(RUN_FILES)}), but other "
                              f"files ({listing})")
    if not settings.resume and not settings.force:
        if holds_run:
            raise ComparisonError(f"--out {out} already holds a comparison; pass --resume to continue it, or choose "
                                  "another --out")
        if others:
            raise ComparisonError(f"--out {out} is not empty ({listing}); choose a new or empty folder, or pass "
                                  "--force to write the run's files into it")
    try:
        check_writable(out, "--out")
    except ValueError as error:
        raise ComparisonError(str(error)) from None


def _check_batch_fits(batch_size: int, dataset: Dataset) -> None:
    """A batch of float32 inputs (the inference timing makes one of exactly the validation batch, at least
    --batch-size) must fit in memory; a lower bound of what a step needs, so a refused batch clearly cannot run."""
    needed = 4 * evaluation_batch_size(batch_size) * math.prod(dataset.input_shape)
    if needed > machine_memory_bytes():
        raise ComparisonError(f"--batch-size {batch_size} of {'x'.join(map(str, dataset.input_shape))} inputs needs "
                              f"at least {needed / 2**30:,.1f} GiB of memory (float32); this machine has "
                              f"{machine_memory_bytes() / 2**30:,.1f} GiB")


def _environment(distributed: Distributed) -> dict:
    return {"torch": torch.__version__, "device": str(distributed.device), "threads": torch.get_num_threads(),
            "processes": distributed.world_size, "python": platform.python_version(),
            "platform": f"{platform.system()} {platform.machine()}",
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": native_bf16()}


def _report(settings: ComparisonSettings, dataset: Dataset, trainers: dict[str, Trainer], distributed: Distributed,
            complete: bool) -> dict:
    models = {twin: {"name": settings.model_name, "separable": twin == "separable",
                     **count_costs(trainer.model, dataset.input_shape), "inference_ms": None,
                     "optimized_inference_ms": None, "bf16_inference_ms": None, "bf16_inference": None,
                     "train_step_ms": None, "layer_times": None,
                     "epochs": trainer.history, "diverged_at_epoch": trainer.diverged_at}
              for twin, trainer in trainers.items()}
    machine = None
    if complete:
        trained = {twin: trainer.model for twin, trainer in trainers.items()}
        times = measure_times(trained, dataset.train_inputs, dataset.train_labels, settings.batch_size,
                              settings.learning_rate, validation=(dataset.validation_inputs, dataset.validation_labels))
        machine = measure_machine(device=distributed.device)  # once per run: both twins' roofs
        layer_times = profile_layers(trained, dataset.train_inputs, settings.batch_size, machine)
        for twin in trained:
            models[twin].update(times[twin], layer_times=layer_times[twin])
    metrics = build_metrics(status="complete" if complete else "interrupted", settings=settings.as_metrics(),
                            dataset=dataset.summary(), environment=_environment(distributed), models=models,
                            timing_method=TIMING_METHOD if complete else None,
                            machine=None if machine is None else machine_metrics(machine),
                            resume_command=settings.command_line(resume=True))
    write_report(settings.out, metrics, {twin: trainer.model for twin, trainer in trainers.items() if trainer.stopped})
    return metrics


def _trained_line(twin: str, trainer: Trainer) -> str:
    history = trainer.history
    summary = summarize_history(history)
    if trainer.diverged_at is not None:
        return (f"{twin} twin: DIVERGED at epoch {trainer.diverged_at} (loss {history[-1]['train_loss']:g}); "
                "training stopped there")
    return (f"{twin} twin: {len(history)} epochs, validation accuracy "
            f"{100 * summary['final_validation_accuracy']:.2f}% (best {100 * summary['best_validation_accuracy']:.2f}% "
            f"at epoch {summary['best_epoch']}), {summary['seconds_per_epoch']['median']:.2f} s per epoch (median)")


def run_comparison(settings: ComparisonSettings, *, progress: bool | None = None, echo=print) -> dict | None:
    """Run the comparison; returns the metrics (``None`` on ranks other than 0 under ``torchrun``).

    Raises :class:`ComparisonError`, :class:`~sepconv.experiment.data.DataError`,
    :class:`~sepconv.experiment.train.CheckpointMismatch` or :class:`~sepconv._extras.MissingExtra` (an extra
    is not installed) before writing anything; :class:`~sepconv._io.WriteError` if a write fails later (a full
    disk); ``KeyboardInterrupt`` after writing the partial report. ``progress``: bars per epoch and batch
    (default: only in a terminal).
    ``echo`` prints a line (rank 0 only).
    """
    distributed = Distributed.from_environment()
    say = echo if distributed.is_main else (lambda line: None)
    trained = False  # every process has run all of training's collectives: they can meet before leaving the group
    try:
        for module in ("matplotlib", "tqdm"):  # the plots and the progress bars: fail before any work
            require(module, "experiment", "sepconv compare")
        _check_out_dir(settings)  # before the data, which may be a download: a wrong --out is said at once
        dataset = load_dataset(settings.dataset, settings.data_dir, settings.seed, settings.eeg_options)
        _check_batch_fits(settings.batch_size, dataset)
        twins = build_twins(settings.model_name, dataset, settings.seed)
        training = TrainingSettings(settings.epochs, settings.batch_size, settings.learning_rate, settings.seed)
        run = {"model": settings.model_name, "dataset": settings.dataset, "batch_size": settings.batch_size,
               "learning_rate": settings.learning_rate, "seed": settings.seed, "processes": distributed.world_size,
               "data_dir": None if settings.data_dir is None else str(Path(settings.data_dir).resolve())}
        if settings.eeg_options != EEGOptions():  # only then: checkpoints of runs without them stay resumable
            run["eeg_options"] = asdict(settings.eeg_options)
        trainers = {twin: Trainer(model, dataset, training, settings.out / "checkpoints" / f"{twin}.pt",
                                  label=f"{twin} twin", run={**run, "twin": twin}, distributed=distributed,
                                  progress=progress) for twin, model in twins.items()}
        resumed = [twin for twin, trainer in trainers.items() if settings.resume and trainer.resume()]
        say(f"sepconv compare: {settings.model_name}, standard vs separable, on {dataset.name} "
            f"({len(dataset.train_labels):,} training / {len(dataset.validation_labels):,} validation inputs); "
            f"{settings.epochs} epochs, batch {settings.batch_size}, seed {settings.seed}"
            + (f", {distributed.world_size} processes" if distributed.world_size > 1 else "") + f" -> {settings.out}")
        if settings.resume:
            say("resuming: " + ", ".join(f"{twin} twin after epoch {trainers[twin].epochs_done}" for twin in resumed)
                if resumed else f"--resume: no checkpoint in {settings.out / 'checkpoints'}; starting at epoch 1")
        try:
            for twin, trainer in trainers.items():
                trainer.fit()
                say(_trained_line(twin, trainer))
            trained = True
            if not distributed.is_main:
                return None
            say("measuring inference (as trained, optimised, and in bf16 where the CPU has it) and training-step "
                "times (torch.utils.benchmark), then each layer against the roofline ...")
            metrics = _report(settings, dataset, trainers, distributed, complete=True)
        except KeyboardInterrupt:  # Ctrl-C: the checkpoints hold the completed epochs; report them
            if distributed.is_main:
                _report(settings, dataset, trainers, distributed, complete=False)
                say(f"interrupted: a partial report is in {settings.out / 'report.html'}; continue with: "
                    f"{settings.command_line(resume=True)}")
            raise
        say("")
        say(markdown_table(*summary_table(metrics)))
        say("")
        say("speed-up of the separable twin: " + "; ".join(speedup_lines(metrics)))
        say("; ".join(bf16_lines(metrics)))
        say(f"wrote {settings.out / 'report.html'}, report.md, metrics.json and the plots")
        return metrics
    finally:
        distributed.close(wait_for_all=trained)  # ranks other than 0 wait here until rank 0 has written the report
