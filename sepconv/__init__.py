"""sepconv: separable convolutions for PyTorch — correct, complete, measurable.

>>> import torch, sepconv
>>> layer = sepconv.SeparableConv2d(32, 64, kernel_size=3, stride=2, padding="same")
>>> layer(torch.randn(1, 32, 15, 15)).shape
torch.Size([1, 64, 8, 8])
"""

from . import cost, functional, geometry, models
from .constraints import apply_constraints, attach_constraints
from .conversion import convert, load_converted, materialize
from .decomposition import decompose
from .distillation import distill
from .inference import optimize_for_inference
from .training import fuse_for_training
from .profiling import Profile, profile
from .layers import *  # noqa: F403
from .layers import __all__ as _layers

__version__ = "0.1.0"
__all__ = ["cost", "functional", "geometry", "models", "profile", "Profile", "apply_constraints", "attach_constraints", "convert", "decompose", "distill",
           "fuse_for_training", "load_converted", "optimize_for_inference", "materialize", *_layers]
