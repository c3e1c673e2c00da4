"""``fuse_for_training``: a model whose batch norm -> activation pairs train as one fused layer on the CPU."""

from __future__ import annotations

import copy

from torch import nn

from .activations import TRAINABLE
from .activations import of_module as activation_of
from .layers.norm import BatchNormAct2d, BatchNormAct3d

__all__ = ["fuse_for_training"]


def fuse_for_training(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """``model`` (a copy unless ``inplace``) with every ``nn.BatchNorm2d`` (``nn.BatchNorm3d``) inside an
    ``nn.Sequential`` that is followed by ReLU, ReLU6, an Identity or nothing (``"none"``) replaced by a
    :class:`~sepconv.BatchNormAct2d` (:class:`~sepconv.BatchNormAct3d`) holding the same parameters and buffers; the
    activation module is removed. The state dict keeps its keys, so checkpoints load either way, and the outputs and
    gradients are the same. Worth it for eager training in channels-last (``model.to(memory_format=
    torch.channels_last)``, or ``channels_last_3d``); under ``torch.compile`` the layer is PyTorch's batch norm and
    activation, which inductor fuses itself."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            _fuse_sequence(module)
    return model


_FUSED = {nn.BatchNorm2d: BatchNormAct2d, nn.BatchNorm3d: BatchNormAct3d}


def _fuse_sequence(sequence: nn.Sequential) -> None:
    names = list(sequence._modules)
    for index, name in enumerate(names):
        norm = sequence._modules.get(name)
        fused_type = _FUSED.get(type(norm))
        if fused_type is None or not norm.affine:
            continue
        following = sequence._modules.get(names[index + 1]) if index + 1 < len(names) else None
        activation = ("none", 1.0) if following is None else activation_of(following)
        if activation is None or activation[0] not in TRAINABLE:
            continue
        sequence._modules[name] = fused_type.from_batch_norm(norm, activation[0])
        if following is not None:
            del sequence._modules[names[index + 1]]
