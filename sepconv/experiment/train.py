"""Training one model: epochs of Adam on the training set, validation after each, an atomic checkpoint each epoch.

Determinism: the data order of epoch ``e`` comes from a :class:`~torch.utils.data.DistributedSampler` seeded
with ``seed`` and ``e`` (its own generator, not the global one), and the global RNG (dropout) starts every
training from ``seed``; a checkpoint stores the model, the optimizer, the history and every process' RNG
state, so a resumed run continues exactly where the last completed epoch left off and ends with the same
metrics as an uninterrupted one (on a GPU only as far as its kernels are deterministic). An interrupted epoch
is simply run again. A checkpoint carries a digest of its content (:func:`sepconv._io.save_checkpoint`), so a
damaged one is refused rather than resumed.

Divergence: an epoch whose training or validation loss is not finite (nan or inf) stops the training there;
:attr:`Trainer.diverged_at` records the epoch, and the checkpoint keeps the last finite one.

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) each process trains a
:class:`~torch.nn.parallel.DistributedDataParallel` replica on its shard of every epoch (``--batch-size`` is
per process), validation is sharded and summed, and only rank 0 writes.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DistributedSampler

from .._extras import require
from .._io import CheckpointError, load_checkpoint, save_checkpoint
from ..constraints import apply_constraints
from .data import Dataset

__all__ = ["TrainingSettings", "Distributed", "Trainer", "CheckpointMismatch", "train_step",
           "evaluation_batch_size"]

CHECKPOINT_FORMAT = "sepconv.compare.checkpoint/1"
MIN_EVALUATION_BATCH = 256  # validation needs no gradients: larger batches, fewer calls


def evaluation_batch_size(batch_size: int) -> int:
    """The batch of inference (validation, and the inference timing of ``sepconv compare``): the training batch, at
    least ``MIN_EVALUATION_BATCH``."""
    return max(batch_size, MIN_EVALUATION_BATCH)


@dataclass(frozen=True)
class TrainingSettings:
    """How both twins are trained: Adam with ``learning_rate``, ``batch_size`` inputs per step and process."""

    epochs: int
    batch_size: int
    learning_rate: float
    seed: int


class CheckpointMismatch(ValueError):
    """A checkpoint that belongs to another run (other model, data or settings) than the one asked for."""


@dataclass(frozen=True)
class Distributed:
    """This process' place in a ``torchrun`` launch, or a single process (rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def from_environment(cls) -> Distributed:
        """Join the process group ``torchrun`` describes (gloo on CPU, nccl on GPU), or run alone."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), device)

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and prints."""
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.world_size == 1:
            return model
        return nn.parallel.DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda"
                                                   else None)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over the processes."""
        if self.world_size > 1:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def gather(self, value) -> list:
        """Every process' ``value``, in rank order (a picklable object)."""
        if self.world_size == 1:
            return [value]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def close(self, *, wait_for_all: bool = False) -> None:
        """Leave the process group; with ``wait_for_all`` first wait until every process gets here (only where all
        have run the same collectives: after a failure they may be at different ones, and the wait would hang)."""
        if self.world_size > 1 and dist.is_initialized():
            try:
                if wait_for_all:
                    # No process may exit right after a collective: Gloo's worker thread can still be releasing its
                    # tensors, which takes the GIL, and a thread that asks for the GIL once the interpreter shuts
                    # down is ended inside a C++ destructor ("terminate called without an active exception",
                    # SIGABRT). Ranks other than 0 end with the checkpoint's gather while rank 0 goes on to report;
                    # waiting here with the GIL released lets their worker finish. A monitored barrier gives Gloo's
                    # worker threads no work; a plain barrier would, and its work holds the collective it found in
                    # flight, releasing it just as late.
                    if dist.get_backend() == "gloo":
                        dist.monitored_barrier()
                    else:
                        dist.barrier()
            finally:
                dist.destroy_process_group()


def _rng_state(device: torch.device) -> dict:
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def train_step(network: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor,
               labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on cross-entropy, then the model's constraints; returns the loss and the logits."""
    logits = network(inputs)
    loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    apply_constraints(network)  # EEGNet's max-norms, as Keras applies them after each step
    return loss, logits


def _tally(loss_sum: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed loss, correct predictions and inputs of one batch, in float64 so that epoch sums stay exact."""
    count = torch.tensor(len(labels), dtype=torch.float64, device=labels.device)
    return torch.stack([loss_sum.double(), (logits.argmax(1) == labels).sum().double(), count])


class Trainer:
    """Trains ``model`` on ``dataset`` with ``settings``, checkpointing to ``checkpoint`` after every epoch.

    Attributes:
        history: one dict per completed epoch: ``epoch`` (1-based), ``train_loss``, ``train_accuracy`` (mean
            over the epoch's batches in training mode, as Keras reports them), ``validation_loss``,
            ``validation_accuracy`` (the whole validation set in eval mode after the epoch), ``seconds`` (wall
            time of the epoch: training and validation). Losses are mean cross-entropies, accuracies fractions.
        run: what identifies the run (model, data, settings); a checkpoint of another run is refused.
        diverged_at: the epoch (1-based) whose loss was not finite, where training stopped; ``None`` if none.
    """

    def __init__(self, model: nn.Module, dataset: Dataset, settings: TrainingSettings, checkpoint, *, label: str,
                 run: dict, distributed: Distributed = Distributed(), progress: bool | None = None):
        self.model = model.to(distributed.device)
        self.settings, self.checkpoint = settings, Path(checkpoint)
        self.label, self.run, self.distributed = label, run, distributed
        self.progress = progress if distributed.is_main else False
        self.network = distributed.wrap(self.model)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=settings.learning_rate)
        device = distributed.device
        self.train_inputs, self.train_labels = dataset.train_inputs.to(device), dataset.train_labels.to(device)
        self.validation_inputs = dataset.validation_inputs.to(device)
        self.validation_labels = dataset.validation_labels.to(device)
        self.history: list[dict] = []
        self.diverged_at: int | None = None
        self._resumed_rng: dict | None = None

    @property
    def epochs_done(self) -> int:
        return len(self.history)

    @property
    def finished(self) -> bool:
        return self.epochs_done >= self.settings.epochs

    @property
    def stopped(self) -> bool:
        """Trained all its epochs, or diverged."""
        return self.finished or self.diverged_at is not None

    def resume(self) -> bool:
        """Load the checkpoint if there is one (else ``False``); :class:`CheckpointMismatch` if it is another run's."""
        if not self.checkpoint.exists():
            return False
        try:
            state = load_checkpoint(self.checkpoint)  # on the CPU: RNG states stay there
        except CheckpointError as error:
            raise CheckpointMismatch(str(error)) from None
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointMismatch(f"{self.checkpoint} is not a sepconv compare checkpoint")
        differences = [f"{key}={state['run'].get(key)!r} there, {value!r} here" for key, value in self.run.items()
                       if state["run"].get(key) != value]
        if differences:
            raise CheckpointMismatch(f"{self.checkpoint} belongs to another run: {'; '.join(differences)}")
        if state["epoch"] > self.settings.epochs:
            raise CheckpointMismatch(f"{self.checkpoint} has trained {state['epoch']} epochs, more than --epochs "
                                     f"{self.settings.epochs}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.history = list(state["history"])
        self._resumed_rng = state["rng"][self.distributed.rank]
        return True

    def fit(self) -> list[dict]:
        """Train the remaining epochs; returns :attr:`history`. Ctrl-C leaves the last epoch's checkpoint."""
        tqdm = require("tqdm.auto", "experiment", "training").tqdm

        if self._resumed_rng is not None:
            _set_rng_state(self._resumed_rng, self.distributed.device)
        else:  # every training starts from the same RNG state, whatever ran before it
            torch.manual_seed(self.settings.seed + self.distributed.rank)
        sampler = DistributedSampler(self.train_labels, num_replicas=self.distributed.world_size,
                                     rank=self.distributed.rank, shuffle=True, seed=self.settings.seed)
        disable = None if self.progress is None else not self.progress  # None: bars only in a terminal
        with tqdm(total=self.settings.epochs, initial=self.epochs_done, desc=self.label, unit="epoch",
                  disable=disable) as epochs_bar:
            for epoch in range(self.epochs_done, self.settings.epochs):
                start = time.perf_counter()
                sampler.set_epoch(epoch)
                train_loss, train_accuracy = self._train_epoch(list(sampler), epoch, disable)
                validation_loss, validation_accuracy = self._evaluate()
                self.history.append({"epoch": epoch + 1, "train_loss": train_loss, "train_accuracy": train_accuracy,
                                     "validation_loss": validation_loss, "validation_accuracy": validation_accuracy,
                                     "seconds": time.perf_counter() - start})
                if not (math.isfinite(train_loss) and math.isfinite(validation_loss)):  # summed: every rank agrees
                    self.diverged_at = epoch + 1  # stop; the checkpoint keeps the last finite epoch
                    break
                self._save_checkpoint()
                epochs_bar.update()
                epochs_bar.set_postfix(train_acc=f"{train_accuracy:.3f}", val_acc=f"{validation_accuracy:.3f}")
        return self.history

    def _train_epoch(self, order: list[int], epoch: int, disable: bool | None) -> tuple[float, float]:
        tqdm = require("tqdm.auto", "experiment", "training").tqdm

        self.network.train()
        order = torch.tensor(order, device=self.distributed.device)
        totals = torch.zeros(3, dtype=torch.float64, device=self.distributed.device)  # loss sum, correct, count
        batch_size = self.settings.batch_size
        for start in tqdm(range(0, len(order), batch_size), desc=f"epoch {epoch + 1}", unit="batch", leave=False,
                          disable=disable):
            batch = order[start:start + batch_size]
            inputs, labels = self.train_inputs[batch], self.train_labels[batch]
            loss, logits = train_step(self.network, self.optimizer, inputs, labels)
            totals += _tally(loss.detach() * len(batch), logits, labels)
        loss_sum, correct, count = self.distributed.sum(totals).tolist()
        return loss_sum / count, correct / count

    @torch.no_grad()
    def _evaluate(self) -> tuple[float, float]:
        """Loss and accuracy on the whole validation set (each process a strided shard, then summed)."""
        self.network.eval()
        rank, world_size = self.distributed.rank, self.distributed.world_size
        inputs, labels = self.validation_inputs[rank::world_size], self.validation_labels[rank::world_size]
        totals = torch.zeros(3, dtype=torch.float64, device=self.distributed.device)
        step = evaluation_batch_size(self.settings.batch_size)
        for start in range(0, len(labels), step):
            logits = self.model(inputs[start:start + step])  # no DDP: no gradients to synchronise
            batch_labels = labels[start:start + step]
            totals += _tally(F.cross_entropy(logits, batch_labels, reduction="sum"), logits, batch_labels)
        loss_sum, correct, count = self.distributed.sum(totals).tolist()
        return loss_sum / count, correct / count

    def _save_checkpoint(self) -> None:
        rng = self.distributed.gather(_rng_state(self.distributed.device))  # every process takes part
        if self.distributed.is_main:
            save_checkpoint({"format": CHECKPOINT_FORMAT, "run": self.run, "label": self.label,
                             "epoch": self.epochs_done, "model": self.model.state_dict(),
                             "optimizer": self.optimizer.state_dict(), "rng": rng, "history": self.history},
                            self.checkpoint)
