"""X3D-XS and X3D-S, as SlowFast builds them, and their standard-convolution twin."""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from ..layers import Conv3d, DepthwiseConv3d, PointwiseConv3d
from ..layers._common import check_channels
from ._common import Classifier, ConvNormAct, check_flag, check_input_size, check_positive, check_rate
from ._registry import register_model
from .mobilenet_v2 import make_divisible

# SlowFast's X3D builder (slowfast/models/video_model_builder.py, class X3D) and its configs
# (configs/Kinetics/X3D_XS.yaml, X3D_S.yaml): widths and block counts before the expansion factors.
STEM_WIDTH = 12  # X3D.DIM_C1
STAGE_WIDTHS = (12, 24, 48, 96)  # res2-res5
STAGE_DEPTHS = (1, 2, 5, 3)
BOTTLENECK_FACTOR = 2.25  # X3D.BOTTLENECK_FACTOR: a block's hidden width over its output width
SQUEEZE_RATIO = 1 / 16  # the squeeze-excitation width over the hidden width (SE ratio 0.0625)
HEAD_WIDTH = 2048  # X3D.DIM_C5
STEM_TEMPORAL_KERNEL = 5
# The stem and the four stages halve height and width five times: from 32 pixels on, every stage's input still
# has more than one pixel per spatial axis. Time is never strided.
MIN_INPUT_SIZE = 32


def round_width(width: int, factor: float) -> int:
    """SlowFast's ``round_width`` with its default divisor 1: ``width * factor`` rounded half up, at least 1."""
    return max(1, int(width * factor + 0.5))


def _channelwise(channels: int, kernel_size, stride, padding, separable: bool) -> nn.Module:
    """X3D's channel-wise (depthwise) convolution, or with ``separable=False`` the dense one of the same width."""
    if separable:
        return DepthwiseConv3d(channels, kernel_size, stride, padding, bias=False)
    return Conv3d(channels, channels, kernel_size, stride, padding, bias=False)


class SqueezeExcitation(nn.Module):
    """Global average pool -> pointwise (bias) -> ReLU -> pointwise (bias) -> sigmoid, scaling the input's channels.

    The squeezed width is ``make_divisible(channels * ratio, 8)``, as SlowFast's ``SE`` rounds it.
    """

    def __init__(self, channels: int, ratio: float = SQUEEZE_RATIO):
        super().__init__()
        squeezed = make_divisible(channels * ratio)
        self.gate = nn.Sequential(OrderedDict(
            pool=nn.AdaptiveAvgPool3d(1), reduce=PointwiseConv3d(channels, squeezed), act=nn.ReLU(),
            expand=PointwiseConv3d(squeezed, channels), sigmoid=nn.Sigmoid()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class X3DBlock(nn.Module):
    """X3D's residual bottleneck (SlowFast's ``ResBlock`` over ``X3DTransform``): pointwise expand -> BN -> ReLU;
    channel-wise 3x3x3 (spatial ``stride``) -> BN -> squeeze-excitation (if ``squeeze``) -> Swish; pointwise
    project -> BN; added to the input (through a strided pointwise conv -> BN where the shape changes); ReLU.

    With ``separable=False`` the channel-wise 3x3x3 becomes a dense 3x3x3 convolution of the same width.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, squeeze: bool, *, separable: bool):
        super().__init__()
        hidden = int(BOTTLENECK_FACTOR * out_channels)
        steps = OrderedDict(conv=_channelwise(hidden, 3, (1, stride, stride), 1, separable),
                            norm=nn.BatchNorm3d(hidden))
        if squeeze:
            steps["squeeze"] = SqueezeExcitation(hidden)
        steps["act"] = nn.SiLU()  # Swish
        self.main = nn.Sequential(OrderedDict(
            expand=ConvNormAct(PointwiseConv3d(in_channels, hidden, bias=False), nn.BatchNorm3d(hidden), nn.ReLU()),
            spatiotemporal=nn.Sequential(steps),
            project=ConvNormAct(PointwiseConv3d(hidden, out_channels, bias=False), nn.BatchNorm3d(out_channels))))
        self.shortcut = None
        if in_channels != out_channels or stride != 1:
            self.shortcut = ConvNormAct(Conv3d(in_channels, out_channels, 1, (1, stride, stride), bias=False),
                                        nn.BatchNorm3d(out_channels))
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act((x if self.shortcut is None else self.shortcut(x)) + self.main(x))

    def residual_parts(self):
        """``(steps, shortcut, activation)`` of ``forward`` (``optimize_for_inference`` adds in an epilogue)."""
        return [self.main], self.shortcut, self.act


class X3D(Classifier):
    """X3D (Feichtenhofer 2020, "X3D: Expanding Architectures for Efficient Video Recognition", CVPR,
    arXiv:2004.04730), layer for layer as SlowFast's ``X3D`` builds it (facebookresearch/SlowFast,
    ``slowfast/models/video_model_builder.py``, ``resnet_helper.X3DTransform``, ``stem_helper.X3DStem``,
    ``head_helper.X3DHead``, configs ``Kinetics/X3D_XS.yaml`` and ``X3D_S.yaml``).

    Input ``(N, C, T, H, W)``: ``T`` frames of ``H x W``. Layout (the paper's Table 1, X3D-M's, which X3D-XS and
    -S share; expansion ``gamma_w = 2``, ``gamma_b = 2.25``, ``gamma_d = 2.2``):

    * conv1: a 1x3x3 convolution, stride 1x2x2, to 24 channels, then a channel-wise 5x1x1 one -> BN -> ReLU;
    * res2-res5: ``ceil(2.2 * (1, 2, 5, 3)) = (3, 5, 11, 7)`` :class:`X3DBlock` of width 24, 48, 96, 192 (hidden
      54, 108, 216, 432), the first of each stage with spatial stride 2, every other one (the first, third, ...)
      with squeeze-excitation;
    * conv5: pointwise to 432 -> BN -> ReLU; global average pool; pointwise to 2048 -> ReLU (no BN); dropout;
      dense to the classes.

    No convolution biases except the squeeze-excitation's; BN with PyTorch's defaults; time is never strided.
    Initialisation as SlowFast's ``init_weights``: convolutions He-normal (fan out), the last BN of every block's
    residual branch zero (each block starts as its shortcut), the classifier normal with standard deviation 0.01
    and zero bias.

    Parameters at the defaults (400 classes): 3,794,322 (SlowFast's MODEL_ZOO.md: 3.8M). Forward multiply-adds
    per clip as ``sepconv.profile`` counts them: 605 M at 4x160x160 (X3D-XS; the model zoo: 0.60 GFLOPs, which
    there count multiply-adds) and 1,963 M at 13x160x160 (X3D-S; 1.96).

    Deliberate differences from SlowFast: the model returns logits (SlowFast's test mode ends in a softmax), and
    its head pools globally where SlowFast's averages over a fixed window (the same for the nominal input).

    Args:
        num_classes: classifier outputs.
        num_frames: nominal clip length ``T`` (4 for X3D-XS, 13 for X3D-S); the layers do not depend on it and
            any clip of at least one frame is accepted; recorded in ``input_shape``.
        input_size: nominal frame size, int or ``(H, W)`` (160 for X3D-XS and -S); any size of at least 32x32 is
            accepted; recorded in ``input_shape``.
        in_channels: channels of the input frames.
        width_factor, depth_factor: the paper's expansion factors ``gamma_w`` (widths
            ``round(base * gamma_w)`` of the bases 12, 12, 24, 48, 96) and ``gamma_d`` (blocks
            ``ceil(base * gamma_d)``); 2.0 and 2.2 for X3D-XS and -S.
        dropout: rate before the classifier (0.5 in SlowFast's configs).
        separable: ``False`` builds the twin: every channel-wise convolution (the blocks' 3x3x3 and the stem's
            5x1x1) becomes a dense convolution with the same kernel, stride, padding and width.

    Examples:
        >>> import torch
        >>> model = X3D(num_classes=10, num_frames=2, input_size=32)
        >>> model(torch.randn(2, *model.input_shape)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 400, *, num_frames: int = 4, input_size=160, in_channels: int = 3,
                 width_factor: float = 2.0, depth_factor: float = 2.2, dropout: float = 0.5, separable: bool = True):
        check_channels(num_classes, "num_classes")
        check_channels(num_frames, "num_frames")
        height, width = check_input_size(input_size, MIN_INPUT_SIZE)
        check_channels(in_channels, "in_channels")
        check_positive(width_factor, "width_factor")
        check_positive(depth_factor, "depth_factor")
        check_rate(dropout, "dropout")
        check_flag(separable, "separable")

        channels = round_width(STEM_WIDTH, width_factor)
        layers = OrderedDict(stem=nn.Sequential(OrderedDict(
            spatial=Conv3d(in_channels, channels, (1, 3, 3), (1, 2, 2), (0, 1, 1), bias=False),
            temporal=ConvNormAct(_channelwise(channels, (STEM_TEMPORAL_KERNEL, 1, 1), 1,
                                              (STEM_TEMPORAL_KERNEL // 2, 0, 0), separable),
                                 nn.BatchNorm3d(channels), nn.ReLU()))))
        for stage, (stage_width, stage_depth) in enumerate(zip(STAGE_WIDTHS, STAGE_DEPTHS), start=2):
            out_channels = round_width(stage_width, width_factor)
            layers[f"res{stage}"] = nn.Sequential(*(
                X3DBlock(channels if index == 0 else out_channels, out_channels, 2 if index == 0 else 1,
                         squeeze=index % 2 == 0, separable=separable)
                for index in range(math.ceil(depth_factor * stage_depth))))
            channels = out_channels
        hidden = int(BOTTLENECK_FACTOR * channels)
        layers["conv5"] = ConvNormAct(PointwiseConv3d(channels, hidden, bias=False), nn.BatchNorm3d(hidden),
                                      nn.ReLU())
        head = nn.Sequential(OrderedDict(
            pool=nn.AdaptiveAvgPool3d(1),
            fc=ConvNormAct(PointwiseConv3d(hidden, HEAD_WIDTH, bias=False), activation=nn.ReLU()),
            dropout=nn.Dropout(dropout),
            flatten=nn.Flatten(1),
            classifier=nn.Linear(HEAD_WIDTH, num_classes)))
        super().__init__(nn.Sequential(layers), head, (in_channels, num_frames, height, width),
                         (1, MIN_INPUT_SIZE, MIN_INPUT_SIZE))
        self.width_factor, self.depth_factor, self.separable = width_factor, depth_factor, separable
        self._initialise()

    def _initialise(self) -> None:
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, X3DBlock):
                    nn.init.zeros_(module.main.project.norm.weight)
                elif isinstance(module, (DepthwiseConv3d, PointwiseConv3d, nn.Conv3d)):
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
            nn.init.normal_(self.head.classifier.weight, std=0.01)
            nn.init.zeros_(self.head.classifier.bias)


@register_model("x3d_xs")
def x3d_xs(num_classes: int = 400, *, num_frames: int = 4, input_size=160, **kwargs) -> X3D:
    """X3D-XS: :class:`X3D` for 4 frames of 160x160 (0.60 G multiply-adds per clip)."""
    return X3D(num_classes, num_frames=num_frames, input_size=input_size, **kwargs)


@register_model("x3d_s")
def x3d_s(num_classes: int = 400, *, num_frames: int = 13, input_size=160, **kwargs) -> X3D:
    """X3D-S: the network of X3D-XS (:class:`X3D`) for 13 frames of 160x160 (1.96 G multiply-adds per clip)."""
    return X3D(num_classes, num_frames=num_frames, input_size=input_size, **kwargs)
