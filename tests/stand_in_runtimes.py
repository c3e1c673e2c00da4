"""Runtime candidates for the bench's tests, loaded by its worker process (never by a test): the ONNX reference
evaluator stands in for a runtime, with a clock, a delay or a crash of our choosing."""

import os
import sys
import time

import numpy as np

CALL_S = 0.25  # what the worker's clock advances per call of `ticking`


def _evaluator(model_path, x):
    if "torch" in sys.modules:
        raise RuntimeError("the worker imported torch")
    from onnx.reference import ReferenceEvaluator

    session = ReferenceEvaluator(model_path)
    return lambda: np.asarray(session.run(None, {session.input_names[0]: x})[0])


def ticking(model_path, x, threads, options):
    """Each call moves this process's clock on by exactly CALL_S: times measured anywhere else would differ."""
    evaluate, now = _evaluator(model_path, x), [time.perf_counter()]

    def run():
        now[0] += CALL_S
        return evaluate()
    time.perf_counter = lambda: now[0]
    return run, "fake8"


def hanging(model_path, x, threads, options):
    time.sleep(600)


def crashing(model_path, x, threads, options):
    """Loads, calibrates (one call per block, by the ticking clock) and times one round, then its process dies:
    calls 1-3 are the warm-up, the calibration and the first round's block."""
    run, _ = ticking(model_path, x, threads, options)
    calls = [0]

    def dying():
        calls[0] += 1
        if calls[0] > 3:
            print("stand-in runtime: out of luck", file=sys.stderr, flush=True)
            os._exit(3)
        return run()
    return dying, "fp32"
