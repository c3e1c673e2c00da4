"""Inference: :func:`optimize_for_inference` turns a model into an eval-only copy whose convolution -> batch norm
-> activation chains are single fused kernels (:class:`FusedConv`), in one memory layout for the whole model."""

from .modules import FusedConv, FusedResidual, FusedSeparable, FusedTemporalSpatial
from .optimize import LAYOUTS, optimize_for_inference

__all__ = ["FusedConv", "FusedResidual", "FusedSeparable", "FusedTemporalSpatial", "LAYOUTS", "optimize_for_inference"]
