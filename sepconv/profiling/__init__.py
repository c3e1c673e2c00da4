"""Model profiling: what each layer of a model costs and, measured, how long it takes.

:func:`profile` runs a model once under :class:`OpCounter`, a ``TorchDispatchMode`` that counts every
convolution and matrix product as it runs (functional calls, grouped and depthwise convolutions and
their backward ops included) and attributes it to the module running it. The result is a
:class:`Profile`: one row per counted op, totals, a breakdown by kind in the layout of MobileNets'
Table 2, and table / CSV / JSON / Markdown output. With ``measure=True`` each op is timed, the
machine's memory bandwidth and peak fp32 throughput are probed, and :func:`plot_roofline` draws a PNG.

Conventions (as :mod:`sepconv.cost`): MACs are multiply-adds, FLOPs = 2 x MACs; bias additions, batch
norm, activations and pooling are not counted; ``total_params`` counts every ``nn.Parameter`` (batch-norm
scale and shift included, running statistics not), and the breakdown lists the parameters no counted op
reads apart; bytes are the minimum traffic of each op (its tensors read or written once).

The package is ``sepconv.profiling``, not ``sepconv.profile``: that name is the function.
"""

from .counter import OpCounter, OpRecord
from .profiler import profile
from .report import Profile, Row
from .roofline import plot_roofline
from .timing import Machine, measure_machine

__all__ = ["profile", "Profile", "Row", "OpCounter", "OpRecord", "plot_roofline", "Machine", "measure_machine"]
