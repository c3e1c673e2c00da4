"""What ``sepconv bench`` times, as :class:`Case` rows (a model builder and an input shape): two layer suites,
``depthwise`` (the depthwise layers of MobileNet, EfficientNet, ConvNeXt, RepLKNet and EEGNet, a causal 1-D
convolution, and 3-D ones of X3D, video and volumes) and ``separable`` (separable layers on MobileNetV1's shapes, a k5, a k7, a 1-D, a 3-D and a tiny
one), and the whole-model suite."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

__all__ = ["Case", "DepthwiseShape", "DEPTHWISE_LAYERS", "LAYER_SUITES", "SEPARABLE_LAYERS", "SeparableShape",
           "depthwise_suite", "layer_cases", "model_cases", "select", "separable_suite"]

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
    # 3-D: X3D's channel-wise 3x3x3 (res4 at 16x28x28, res3 at 8x28x28), a 5x5x5 video layer, a 32^3 volume
    ("x3d.res4", 192, (16, 28, 28), (3, 3, 3), 1, ((1, 1),) * 3, 1),
    ("x3d.res3", 96, (8, 28, 28), (3, 3, 3), 1, ((1, 1),) * 3, 1),
    ("video.k5", 48, (16, 56, 56), (5, 5, 5), 1, ((2, 2),) * 3, 1),
    ("volume.k3", 64, (32, 32, 32), (3, 3, 3), 1, ((1, 1),) * 3, 1),
)
# Batch 32 of a 31x31 layer in NCHW takes seconds per call, and of the long 1-D sequence gigabytes: batch 8 there;
# PyTorch's 3-D backward takes up to seconds per sample (issue 27's table): batches 8 and 2.
_BATCH_CAP = {"replknet.k31": 8, "causal1d.k4": 8, "x3d.res4": 1, "x3d.res3": 8, "video.k5": 1, "volume.k3": 2}


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

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.n, self.c, *self.spatial)

    def build(self) -> nn.Module:
        """The layer as a sepconv module (no bias), its weights from the current seed."""
        from .. import DepthwiseConv1d, DepthwiseConv2d, DepthwiseConv3d

        layer = (DepthwiseConv1d, DepthwiseConv2d, DepthwiseConv3d)[len(self.spatial) - 1]
        return layer(self.c, self.kernel, self.stride, self.padding, depth_multiplier=self.multiplier, bias=False)


def depthwise_suite(batches) -> list[DepthwiseShape]:
    """Every layer of :data:`DEPTHWISE_LAYERS` at each batch size (capped where a row would not fit; a capped
    batch already listed is not repeated)."""
    shapes = [DepthwiseShape(name, min(n, _BATCH_CAP.get(name, n)), c, spatial, kernel, stride, padding, multiplier)
              for n in batches for name, c, spatial, kernel, stride, padding, multiplier in DEPTHWISE_LAYERS]
    return list(dict.fromkeys(shapes))


# name, C, spatial, kernel, stride, padding as a user writes it, C_out. "same" with stride 2 on an even size is
# TensorFlow's asymmetric (0, 1) padding; 1 with stride 2 is PyTorch's symmetric one.
SEPARABLE_LAYERS = (
    ("mnv1.1", 32, (112, 112), 3, 1, 1, 64),
    ("mnv1.2", 64, (112, 112), 3, 2, "same", 128),
    ("mnv1.3", 128, (56, 56), 3, 1, 1, 128),
    ("mnv1.4", 128, (56, 56), 3, 2, 1, 256),
    ("mnv1.5", 256, (28, 28), 3, 1, "same", 256),
    ("mnv1.6", 256, (28, 28), 3, 2, "same", 512),
    ("mnv1.7", 512, (14, 14), 3, 1, 1, 512),
    ("mnv1.8", 512, (14, 14), 3, 2, "same", 512),
    ("mnv1.9", 512, (7, 7), 3, 1, 1, 512),
    ("effnet.k5", 256, (28, 28), 5, 2, "same", 256),  # TensorFlow "same" here: (1, 2)
    ("convnext.k7", 128, (56, 56), 7, 1, 3, 128),
    ("eeg.k16", 16, (512,), 16, 1, "same", 16),  # an even kernel: "same" is (7, 8)
    ("vol3d", 32, (8, 28, 28), 3, 1, 1, 64),
    ("tiny", 8, (8, 8), 3, 1, 1, 8),  # the convolutions cost almost nothing: what remains is per-call overhead
)


@dataclass(frozen=True)
class SeparableShape:
    """One depthwise separable layer: batch, channels, spatial size, kernel, stride, padding, output channels."""

    name: str
    n: int
    c: int
    spatial: tuple[int, ...]
    kernel: int
    stride: int
    padding: int | str
    out: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.n, self.c, *self.spatial)

    def build(self) -> nn.Module:
        """The layer as a sepconv module (bias after the pointwise step), its weights from the current seed."""
        from .. import SeparableConv1d, SeparableConv2d, SeparableConv3d

        layer = (SeparableConv1d, SeparableConv2d, SeparableConv3d)[len(self.spatial) - 1]
        return layer(self.c, self.out, self.kernel, self.stride, self.padding)


def separable_suite(batches) -> list[SeparableShape]:
    """Every layer of :data:`SEPARABLE_LAYERS` at each batch size."""
    return [SeparableShape(name, n, *layer) for n in batches for name, *layer in SEPARABLE_LAYERS]


# suite name -> (row name prefix, the suite's layers at given batch sizes)
LAYER_SUITES = {"depthwise": ("dw", depthwise_suite), "separable": ("sep", separable_suite)}


@dataclass(frozen=True)
class Case:
    """One benchmark row: ``build()`` makes the model (seeded by the runner), ``input_shape`` its input;
    ``input_grad``: a training step also computes the input's gradient, as a layer inside a network does;
    ``precision``: the dtype of the model and input ("fp32", or "bf16": every candidate on bf16 weights and input)."""

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    input_grad: bool = False
    precision: str = "fp32"


def layer_cases(batches=(1, 32), suite: str = "depthwise", precisions=("fp32",)) -> list[Case]:
    """A layer suite of :data:`LAYER_SUITES` as rows: ``dw.<layer>.b<N>`` or ``sep.<layer>.b<N>``, and for each
    further precision ``<row>.<precision>`` (``dw.mnv1.1.b1.bf16``)."""
    prefix, shapes = LAYER_SUITES[suite]
    return [Case(f"{prefix}.{shape.name}.b{shape.n}" + ("" if precision == "fp32" else f".{precision}"), shape.build,
                 shape.input_shape, input_grad=True, precision=precision)
            for precision in precisions for shape in shapes(batches)]


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
    ("x3d_xs", _registered("x3d_xs"), (3, 4, 160, 160), (1, 8)),
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
