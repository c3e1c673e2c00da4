"""Layers: thin ``nn.Module``s over :mod:`sepconv.functional`; 1d/2d/3d classes only fix the rank."""

from .conv import Conv1d, Conv2d, Conv3d
from .norm import BatchNormAct2d, BatchNormAct3d
from .depthwise import DepthwiseConv1d, DepthwiseConv2d, DepthwiseConv3d
from .pointwise import PointwiseConv1d, PointwiseConv2d, PointwiseConv3d
from .separable import SeparableConv1d, SeparableConv2d, SeparableConv3d
from .spatial import SpatialSeparableConv2d, SpatialSeparableConv3d

__all__ = [
    "BatchNormAct2d", "BatchNormAct3d",
    "Conv1d", "Conv2d", "Conv3d",
    "DepthwiseConv1d", "DepthwiseConv2d", "DepthwiseConv3d",
    "PointwiseConv1d", "PointwiseConv2d", "PointwiseConv3d",
    "SeparableConv1d", "SeparableConv2d", "SeparableConv3d",
    "SpatialSeparableConv2d", "SpatialSeparableConv3d",
]
