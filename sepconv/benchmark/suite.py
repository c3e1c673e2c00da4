"""What ``sepconv bench`` times: the depthwise layer suite (issue 7's shapes, shared with
``benchmarks/bench_kernels.py``) and the whole-model suite, as :class:`Case` rows (a model builder and an input
shape)."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

__all__ = ["Case", "DepthwiseShape", "DEPTHWISE_LAYERS", "depthwise_suite", "layer_cases", "model_cases", "select"]

# name, C, spatial, kernel, stride, (before, after) padding per axis, depth multiplier
DEPTHWISE_LAYERS = (
    ("mnv1.1", 32, (112, 112), (3, 3), 1, ((1, 1), (1, 1)), 1),
    ("mnv1.2", 64, (112, 112), (3, 3), 2, ((0, 1), (0, 1)), 1),  # Keras: explicit (0,1) then valid
    ("mnv1.7", 512, (14, 14), (3, 3), 1, ((1, 1), (1, 1)), 1),
    ("mnv2.s", 144, (56, 56), (3, 3), 2, ((0, 1), (0, 1)), 1),
    ("mnv2.l", 960, (7, 7), (3, 3), 1, ((1, 1), (1, 1)), 1),
    ("effnet.k5", 240, (28, 28), (5, 5), 2, ((1, 2), (1, 2)), 1),
    ("effnet.k5s1", 480, (14, 14), (5, 5), 1, ((2, 2), (2, 2)), 1),
    ("convnext.k7", 96, (56, 56), (7, 7), 1, ((3, 3), (3, 3)), 1),
    ("replknet.k31", 128, (56, 56), (31, 31), 1, ((15, 15), (15, 15)), 1),
    ("eeg.temporal", 8, (64, 128), (1, 64), 1, ((0, 0), (31, 32)), 1),
    ("eeg.spatial", 8, (64, 128), (64, 1), 1, ((0, 0), (0, 0)), 2),
    ("causal1d.k4", 1536, (2048,), (4,), 1, ((3, 0),), 1),
)
# Batch 32 of a 31x31 layer in NCHW takes seconds per call, and of the long 1-D sequence gigabytes: batch 8 there.
_BATCH_CAP = {"replknet.k31": 8, "causal1d.k4": 8}


@dataclass(frozen=True)
class DepthwiseShape:
    """One depthwise convolution: batch, channels, spatial size, kernel, stride, explicit padding, multiplier."""

    name: str
    n: int
    c: int
    spatial: tuple[int, ...]
    kernel: tuple[int, ...]
    stride: int
    padding: tuple[tuple[int, int], ...]  # (before, after) per axis
    multiplier: int = 1

    def describe(self) -> str:
        size = "x".join(map(str, (self.n, self.c, *self.spatial)))
        pad = ",".join(f"{b}{'' if a == b else '/' + str(a)}" for b, a in self.padding)
        mult = f" M{self.multiplier}" if self.multiplier > 1 else ""
        return f"{size} k{'x'.join(map(str, self.kernel))} s{self.stride} p{pad}{mult}"

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.n, self.c, *self.spatial)

    def build(self) -> nn.Module:
        """The layer as a sepconv module (no bias), its weights from the current seed."""
        from .. import DepthwiseConv1d, DepthwiseConv2d

        layer = DepthwiseConv1d if len(self.spatial) == 1 else DepthwiseConv2d
        return layer(self.c, self.kernel, self.stride, self.padding, depth_multiplier=self.multiplier, bias=False)


def depthwise_suite(batches) -> list[DepthwiseShape]:
    """Every layer of :data:`DEPTHWISE_LAYERS` at each batch size (capped where a row would not fit)."""
    return [DepthwiseShape(name, min(n, _BATCH_CAP.get(name, n)), c, spatial, kernel, stride, padding, multiplier)
            for n in batches for name, c, spatial, kernel, stride, padding, multiplier in DEPTHWISE_LAYERS]


@dataclass(frozen=True)
class Case:
    """One benchmark row: ``build()`` makes the model (seeded by the runner), ``input_shape`` its input."""

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]

    def describe(self) -> str:
        return f"{self.name} {'x'.join(map(str, self.input_shape))}"


def layer_cases(batches=(1, 32)) -> list[Case]:
    """The depthwise layer suite as rows: ``dw.<layer>.b<N>``."""
    return [Case(f"dw.{shape.name}.b{shape.n}", shape.build, shape.input_shape) for shape in depthwise_suite(batches)]


def _registered(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build():
        from ..models import create_model
        return create_model(name, **kwargs)
    return build


# row name, builder, input shape of one sample, batch sizes
_MODELS = (
    ("mobilenet_v1_100", _registered("mobilenet_v1_100"), (3, 224, 224), (1, 16)),
    ("mobilenet_v1_050", _registered("mobilenet_v1_050"), (3, 224, 224), (1, 16)),
    ("mobilenet_v2", _registered("mobilenet_v2"), (3, 224, 224), (1, 16)),
    ("xception", _registered("xception", input_size=96), (3, 96, 96), (1, 16)),
    ("eegnet", _registered("eegnet", num_classes=4, channels=22, samples=1125), (1, 22, 1125), (1, 32)),
    ("vgg_cifar", _registered("vgg_cifar"), (3, 32, 32), (1, 16)),
    ("vgg_cifar_standard", _registered("vgg_cifar", separable=False), (3, 32, 32), (1, 16)),
    ("convnext_k7", _registered("convnext_k7"), (3, 224, 224), (1, 16)),
    ("replknet_k31", _registered("replknet_k31"), (3, 224, 224), (1, 16)),
)


def model_cases(quick: bool = False) -> list[Case]:
    """The whole-model suite: ``<model>.b<N>`` at each batch size (``quick``: batch 1 only)."""
    return [Case(f"{name}.b{n}", build, (n, *shape)) for name, build, shape, batches in _MODELS
            for n in (batches[:1] if quick else batches)]


def select(cases: list[Case], pattern: str | None) -> list[Case]:
    """The rows whose name matches ``pattern``: a shell pattern (``mobilenet*``) or, without wildcards, a substring."""
    if not pattern:
        return list(cases)
    if not any(char in pattern for char in "*?["):
        pattern = f"*{pattern}*"
    return [case for case in cases if fnmatch.fnmatch(case.name, pattern)]
