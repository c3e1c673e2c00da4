"""What ``sepconv bench`` runs: candidates timed in interleaved rounds on model and layer suites.

* :mod:`~sepconv.benchmark.suite` -- the rows: the layer suites (``depthwise``, ``separable``) and the whole-model
  suite, as :class:`Case` (a model builder, an input shape);
* :mod:`~sepconv.benchmark.runner` -- the candidates (PyTorch eager NCHW and channels_last, ``torch.compile``,
  sepconv's kernels in either layout or forced to its C++ backend, ``sepconv.fuse_for_training``,
  ``sepconv.optimize_for_inference``, onnxruntime), their interleaved timing (:mod:`sepconv._timer`), each row's
  roofline time;
* :mod:`~sepconv.benchmark.report` -- the table, ``results.json`` and the speed-up chart.

Nothing here is imported by ``import sepconv``; onnxruntime and matplotlib come with ``sepconv[bench]``.
"""

from .runner import CANDIDATES, RowResult, Timing, default_candidates, run, run_case
from .suite import (LAYER_SUITES, Case, DepthwiseShape, SeparableShape, depthwise_suite, layer_cases, model_cases,
                    select, separable_suite)

__all__ = ["CANDIDATES", "LAYER_SUITES", "Case", "DepthwiseShape", "RowResult", "SeparableShape", "Timing",
           "default_candidates", "depthwise_suite", "layer_cases", "model_cases", "run", "run_case", "select",
           "separable_suite"]
