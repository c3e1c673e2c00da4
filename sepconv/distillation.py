"""Recovering accuracy after conversion: fine-tune the converted model against the original's outputs."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ._extras import require
from ._io import load_checkpoint, save_checkpoint
from .constraints import apply_constraints


def _split(batch):
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (list, tuple)) and 1 <= len(batch) <= 2:
        return batch[0], (batch[1] if len(batch) == 2 else None)
    raise TypeError(f"data must yield tensors x or tuples (x,) / (x, y); got a {type(batch).__name__}")


def distillation_loss(student_out, teacher_out, labels=None, temperature=None, label_weight=0.0):
    """MSE to the teacher's outputs, or with ``temperature`` the KL divergence of softened class
    probabilities (Hinton et al. 2015, scaled by T^2); plus ``label_weight`` x cross-entropy with labels."""
    if temperature is None:
        loss = F.mse_loss(student_out, teacher_out)
    else:
        loss = F.kl_div(F.log_softmax(student_out / temperature, dim=1), F.log_softmax(teacher_out / temperature, dim=1),
                        log_target=True, reduction="batchmean") * temperature ** 2
    if labels is not None and label_weight:
        loss = loss + label_weight * F.cross_entropy(student_out, labels)
    return loss


def distill(student: nn.Module, teacher: nn.Module, data, epochs: int = 1, *, lr: float = 1e-3, optimizer=None,
            temperature: float | None = None, label_weight: float = 0.0, checkpoint=None, progress: bool | None = None):
    """Fine-tune ``student`` to reproduce ``teacher`` on ``data``; returns the mean loss of each epoch.

    Args:
        data: an iterable (e.g. a ``DataLoader``) of ``x``, ``(x,)`` or ``(x, y)`` batches, iterable once per epoch.
        epochs: passes over ``data``.
        lr / optimizer: Adam with this learning rate unless an optimizer over ``student`` is given.
        temperature, label_weight: see :func:`distillation_loss` (labels are used only if batches carry them).
        checkpoint: a path; after every epoch the student, optimizer and history are saved there
            atomically with a digest of their content, and a run that finds the file resumes after its last
            completed epoch (a damaged file raises :class:`~sepconv._io.CheckpointError`).
        progress: a progress bar per epoch (default: only in a terminal).

    Constraints (``max_norm``) of the student are applied after every step, as in training.
    """
    tqdm = require("tqdm.auto", "experiment", "sepconv.distill").tqdm

    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative int; got {epochs!r}")
    optimizer = optimizer if optimizer is not None else torch.optim.Adam(student.parameters(), lr=lr)
    history, start = [], 0
    if checkpoint is not None and Path(checkpoint).exists():
        state = load_checkpoint(checkpoint)  # CheckpointError (a ValueError) if damaged
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        history, start = list(state["history"]), int(state["epoch"])
    teacher.eval()
    for epoch in range(start, epochs):
        student.train()
        total, count = 0.0, 0
        bar = tqdm(data, desc=f"distill epoch {epoch + 1}/{epochs}", disable=None if progress is None else not progress,
                   leave=False)
        for batch in bar:
            x, labels = _split(batch)
            with torch.no_grad():
                target = teacher(x)
            loss = distillation_loss(student(x), target, labels, temperature, label_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            apply_constraints(student)
            total, count = total + float(loss.detach()) * len(x), count + len(x)
            bar.set_postfix(loss=f"{total / count:.4g}")
        history.append(total / max(count, 1))
        if checkpoint is not None:
            save_checkpoint({"epoch": epoch + 1, "student": student.state_dict(), "optimizer": optimizer.state_dict(),
                             "history": history}, checkpoint)
    return history
