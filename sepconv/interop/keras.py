"""Keras 3 weight layouts <-> PyTorch layouts (no Keras import needed).

Keras stores kernels channels-last: a convolution kernel is ``(*kernel_size, C_in / groups, C_out)``,
a depthwise kernel ``(*kernel_size, C, M)`` (output channel ``c * M + m``, the same order as PyTorch's
grouped convolution) and the pointwise kernel of ``SeparableConv`` ``(*ones, C * M, filters)``.
Layers expose ``load_keras_weights(source)`` and ``to_keras_weights()`` built on these functions;
``source`` is a Keras layer (anything with ``get_weights()``) or the list it returns.
"""

from __future__ import annotations

import numpy as np
import torch


def weights_of(source) -> list[np.ndarray]:
    """The weight arrays of a Keras layer, or the list itself."""
    arrays = source.get_weights() if hasattr(source, "get_weights") else source
    if not isinstance(arrays, (list, tuple)):
        raise TypeError(f"source must be a Keras layer or a list of arrays; got {type(source).__name__}")
    return [np.asarray(a) for a in arrays]


def conv_kernel_from_keras(kernel: np.ndarray) -> torch.Tensor:
    """``(*k, C_in / groups, C_out)`` -> ``(C_out, C_in / groups, *k)``."""
    rank = kernel.ndim - 2
    return torch.from_numpy(np.ascontiguousarray(np.transpose(kernel, (rank + 1, rank, *range(rank)))))


def conv_kernel_to_keras(weight: torch.Tensor) -> np.ndarray:
    """``(C_out, C_in / groups, *k)`` -> ``(*k, C_in / groups, C_out)``."""
    rank = weight.ndim - 2
    return weight.detach().cpu().numpy().transpose(*range(2, rank + 2), 1, 0).copy()


def depthwise_kernel_from_keras(kernel: np.ndarray) -> torch.Tensor:
    """``(*k, C, M)`` -> ``(C * M, 1, *k)``."""
    *kernel_size, channels, multiplier = kernel.shape
    flat = kernel.reshape(*kernel_size, channels * multiplier)
    return conv_kernel_from_keras(flat.reshape(*kernel_size, 1, channels * multiplier))


def depthwise_kernel_to_keras(weight: torch.Tensor, in_channels: int) -> np.ndarray:
    """``(C * M, 1, *k)`` -> ``(*k, C, M)``."""
    kernel = conv_kernel_to_keras(weight)  # (*k, 1, C * M)
    return kernel.reshape(*kernel.shape[:-2], in_channels, weight.shape[0] // in_channels)


def check_shape(name: str, array: np.ndarray, expected: tuple[int, ...]) -> None:
    if tuple(array.shape) != tuple(expected):
        raise ValueError(f"Keras {name} has shape {tuple(array.shape)}; this layer needs {tuple(expected)}")


def check_count(arrays: list, expected: int, layer: str, bias: bool) -> None:
    if len(arrays) != expected:
        raise ValueError(f"{layer} with bias={bias} expects {expected} Keras weight arrays (use_bias must match); "
                         f"got {len(arrays)}")


@torch.no_grad()
def assign(parameter: torch.Tensor, value: torch.Tensor) -> None:
    parameter.copy_(value.to(dtype=parameter.dtype, device=parameter.device))


def load_into(layer, source, kernels, bias) -> None:
    """Check and copy Keras arrays into a layer.

    ``kernels``: ``(name, keras_shape, parameter, from_keras)`` for each kernel, in Keras' order;
    ``bias`` (the layer's bias parameter or ``None``) comes last, as in Keras.
    """
    arrays = weights_of(source)
    check_count(arrays, len(kernels) + (bias is not None), type(layer).__name__, bias is not None)
    # Check everything before copying anything, so a bad source leaves the layer as it was.
    for (name, shape, _, _), array in zip(kernels, arrays):
        check_shape(name, array, shape)
    if bias is not None:
        check_shape("bias", arrays[-1], (bias.shape[0],))
    for (_, _, parameter, from_keras), array in zip(kernels, arrays):
        assign(parameter, from_keras(array))
    if bias is not None:
        assign(bias, torch.from_numpy(arrays[-1]))


def export(kernels: list[np.ndarray], bias) -> list[np.ndarray]:
    """Keras' ``get_weights()`` list: the kernels, then the bias if there is one."""
    return kernels + ([bias.detach().cpu().numpy().copy()] if bias is not None else [])
