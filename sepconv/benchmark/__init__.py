"""What ``sepconv bench`` runs: candidates timed in interleaved rounds on model and layer suites.

* :mod:`~sepconv.benchmark.suite` -- the rows: the depthwise layer suite (also used by
  ``benchmarks/bench_kernels.py``) and the whole-model suite, as :class:`Case` (a model builder, an input shape);
* :mod:`~sepconv.benchmark.runner` -- the candidates (PyTorch eager NCHW and channels_last, ``torch.compile``,
  sepconv's kernels, ``sepconv.optimize_for_inference``, onnxruntime), their interleaved timing, each row's
  roofline time;
* :mod:`~sepconv.benchmark.report` -- the table, ``results.json`` and the speed-up chart.

Nothing here is imported by ``import sepconv``; onnxruntime and matplotlib come with ``sepconv[bench]``.
"""

from .runner import CANDIDATES, RowResult, Timing, default_candidates, run, run_case
from .suite import Case, DepthwiseShape, depthwise_suite, layer_cases, model_cases, select

__all__ = ["CANDIDATES", "Case", "DepthwiseShape", "RowResult", "Timing", "default_candidates", "depthwise_suite",
           "layer_cases", "model_cases", "run", "run_case", "select"]
