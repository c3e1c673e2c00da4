"""Port a whole Keras 3 model's weights into a sepconv model: :func:`load_keras_weights`.

The two models are walked in step. On the Keras side, every layer with weights, in ``model.layers`` order
(nested models flattened); on the PyTorch side, every module that holds parameters of its own, in
``model.modules()`` order. The reference models register their modules in Keras' order (in Xception, a
block's main path before its shortcut, as Keras lists them), so the walk pairs them one to one. Each pair
must be of matching kinds (checked for all pairs before anything is copied) and shapes; a failure part way
leaves the model as it was.

Conversions: convolution kernels through each sepconv layer's own ``load_keras_weights``
(:mod:`sepconv.interop.keras` layouts); ``BatchNormalization`` ``gamma, beta, moving_mean, moving_variance``
-> ``weight, bias, running_mean, running_var`` (epsilons must agree); ``Dense`` kernels ``(in, out)`` ->
``(out, in)``, with the rows reordered from Keras' channels-last flatten ``(H, W, C)`` to PyTorch's ``(C, H,
W)`` when the module records the ``feature_shape`` it reads (:class:`sepconv.models._common.Dense`).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn

from ..interop import keras as keras_io
from ..layers import Conv2d, DepthwiseConv2d, PointwiseConv2d, SeparableConv2d

# PyTorch module type -> the Keras layer class it takes weights from (first match wins: subclasses first).
_KERAS_CLASS = ((DepthwiseConv2d, "DepthwiseConv2D"), (SeparableConv2d, "SeparableConv2D"),
                (PointwiseConv2d, "Conv2D"), (Conv2d, "Conv2D"), (nn.BatchNorm2d, "BatchNormalization"),
                (nn.Linear, "Dense"))


def _keras_layers(keras_model) -> list:
    """Layers with weights, in ``layers`` order, nested models flattened."""
    found = []
    for layer in keras_model.layers:
        if hasattr(layer, "layers"):
            found += _keras_layers(layer)
        elif layer.weights:
            found.append(layer)
    return found


def _torch_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules holding parameters of their own, in registration order."""
    return [(name, module) for name, module in model.named_modules()
            if next(module.parameters(recurse=False), None) is not None]


def _keras_class_for(name: str, module: nn.Module) -> str:
    for torch_type, keras_class in _KERAS_CLASS:
        if isinstance(module, torch_type):
            return keras_class
    supported = ", ".join(t.__name__ for t, _ in _KERAS_CLASS)
    raise TypeError(f"module {name!r} ({type(module).__name__}) has no Keras counterpart to load from; "
                    f"supported: {supported}")


def _batch_norm_arrays(module: nn.BatchNorm2d, layer) -> list[np.ndarray]:
    arrays = keras_io.weights_of(layer)
    if len(arrays) != 4:
        raise ValueError(f"BatchNormalization has {len(arrays)} weight arrays; porting needs 4 (gamma, beta, "
                         "moving_mean, moving_variance: center=True, scale=True)")
    for label, array in zip(("gamma", "beta", "moving_mean", "moving_variance"), arrays):
        keras_io.check_shape(label, array, (module.num_features,))
    epsilon = layer.get_config()["epsilon"]
    if not math.isclose(epsilon, module.eps, rel_tol=1e-6):
        raise ValueError(f"BatchNormalization has epsilon={epsilon}; the module has eps={module.eps}")
    return arrays


def _dense_kernel(module: nn.Linear, kernel: np.ndarray) -> torch.Tensor:
    """Keras ``(in, out)`` kernel -> ``(out, in)`` weight, rows reordered from an (H, W, C) to a (C, H, W) flatten."""
    feature_shape = getattr(module, "feature_shape", None)
    if feature_shape is not None:
        channels, height, width = feature_shape
        kernel = kernel.reshape(height, width, channels, -1).transpose(2, 0, 1, 3).reshape(kernel.shape)
    return torch.from_numpy(np.ascontiguousarray(kernel.T))


@torch.no_grad()
def _load_pair(module: nn.Module, layer) -> None:
    if isinstance(module, nn.BatchNorm2d):
        arrays = _batch_norm_arrays(module, layer)
        for target, array in zip((module.weight, module.bias, module.running_mean, module.running_var), arrays):
            keras_io.assign(target, torch.from_numpy(array))
    elif isinstance(module, nn.Linear):
        keras_io.load_into(module, layer, [("kernel", (module.in_features, module.out_features), module.weight,
                                            lambda kernel: _dense_kernel(module, kernel))], module.bias)
    else:  # sepconv convolution layers convert and check their own kernels
        module.load_keras_weights(layer)


def load_keras_weights(model: nn.Module, keras_model) -> nn.Module:
    """Copy every weight of ``keras_model`` (a Keras 3 model) into ``model``; returns ``model``.

    ``model`` must have the same layers in the same order as Keras lists them (the reference models of
    :mod:`sepconv.models` do, with ``separable=True``, for ``keras.applications.MobileNet``, ``MobileNetV2``,
    ``Xception`` and the reference EEGNet). BN moving statistics are copied into the running buffers;
    in eval mode the two models then compute the same function (on NCHW vs NHWC input).

    Raises ``ValueError`` naming the first pair that does not match (kind, shape, count, BN epsilon); the
    model is then left as it was.
    """
    modules = _torch_modules(model)
    layers = _keras_layers(keras_model)
    for (name, module), layer in zip(modules, layers):
        expected = _keras_class_for(name, module)
        if type(layer).__name__ != expected:
            raise ValueError(f"module {name!r} ({type(module).__name__}) needs a Keras {expected}; the Keras layer "
                             f"in its place, {layer.name!r}, is a {type(layer).__name__} (the layouts differ)")
    if len(modules) != len(layers):
        raise ValueError(f"the Keras model has {len(layers)} layers with weights and the model {len(modules)} "
                         "modules with parameters; their layouts differ")
    backup = copy.deepcopy(model.state_dict())
    try:
        for (name, module), layer in zip(modules, layers):
            try:
                _load_pair(module, layer)
            except ValueError as error:
                raise ValueError(f"module {name!r} cannot load Keras layer {layer.name!r}: {error}") from error
    except Exception:
        model.load_state_dict(backup)
        raise
    return model
