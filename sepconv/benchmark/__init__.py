"""What ``sepconv bench`` runs: candidates timed in interleaved rounds on model and layer suites.

* :mod:`~sepconv.benchmark.suite` -- the rows: the layer suites (``depthwise``, ``separable``) and the whole-model
  suite, as :class:`Case` (a model builder, an input shape);
* :mod:`~sepconv.benchmark.runner` -- the PyTorch candidates (eager NCHW and channels_last, ``torch.compile``,
  sepconv's kernels in either layout or forced to its C++ backend, ``sepconv.fuse_for_training``,
  ``sepconv.optimize_for_inference``), the rounds that time every candidate (:mod:`sepconv._timer`), one process
  at a time, and each row's roofline time;
* :mod:`~sepconv.benchmark.runtimes` -- the runtime candidates (ONNX Runtime, OpenVINO at its default precision
  and in f32), each alone in a :mod:`~sepconv.benchmark.worker` process;
* :mod:`~sepconv.benchmark.report` -- the table, ``results.json`` and the speed-up chart.

Nothing here is imported by ``import sepconv``; onnxruntime, openvino and matplotlib come with
``sepconv[bench]``.
"""

from .runner import CANDIDATES, RowResult, Timing, default_candidates, run, run_case
from .suite import (LAYER_SUITES, Case, DepthwiseShape, SeparableShape, depthwise_suite, layer_cases, model_cases,
                    select, separable_suite)

__all__ = ["CANDIDATES", "LAYER_SUITES", "Case", "DepthwiseShape", "RowResult", "SeparableShape", "Timing",
           "default_candidates", "depthwise_suite", "layer_cases", "model_cases", "run", "run_case", "select",
           "separable_suite"]
