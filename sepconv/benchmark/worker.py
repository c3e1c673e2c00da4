"""The process that runs one runtime candidate of ``sepconv bench`` alone (started by
:mod:`sepconv.benchmark.runtimes`, run as a script so that it never imports torch or starts its threads).

It reads one JSON request per line on stdin and answers one JSON line on stdout:

* ``{"load": SPEC, "model": ONNX, "input": NPY, "output": NPY, "threads": N, "options": {...}}`` -- build the
  runtime's session (SPEC is a built-in runtime's name or ``module:function``), run it once (the warm-up) and
  save that output; answers ``{"pid", "precision", "warmup_s"}`` (loading, compiling and that call);
* ``{"calibrate": BLOCK_S}`` -- answers ``{"number"}``, the calls per block of about BLOCK_S seconds;
* ``{"block": NUMBER}`` -- times NUMBER calls here and answers ``{"seconds"}`` per call.

A failure answers ``{"error": "one line"}``. A loader takes ``(model_path, x, threads, options)`` and returns
``(run, precision)``: a no-argument callable returning the output array, and the precision it computes in.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path


def _timer():
    """sepconv's one timer, loaded from its file: importing the package would import torch."""
    spec = importlib.util.spec_from_file_location("sepconv_timer", Path(__file__).parent.parent / "_timer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def onnxruntime(model_path: str, x, threads: int, options: dict):
    import onnxruntime as ort

    settings = ort.SessionOptions()
    settings.intra_op_num_threads = threads
    if not options.get("spinning", True):
        settings.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model_path, settings, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x}
    return (lambda: session.run(None, feed)[0]), "fp32"


def _openvino(model_path: str, x, threads: int, precision: str | None):
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": threads}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = core.compile_model(core.read_model(model_path), "CPU", config)
    request = compiled.create_infer_request()
    request.set_input_tensor(ov.Tensor(x, shared_memory=True))  # as a serving loop would: bound once

    def run():
        request.infer()
        return request.get_output_tensor().data
    chosen = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # "bf16", "f32", "f16"
    return run, {"f32": "fp32", "f16": "fp16"}.get(chosen, chosen)


def openvino(model_path: str, x, threads: int, options: dict):
    """OpenVINO at its default precision hint (bf16 on a CPU with AVX512-BF16 or AMX)."""
    return _openvino(model_path, x, threads, None)


def openvino_f32(model_path: str, x, threads: int, options: dict):
    return _openvino(model_path, x, threads, "f32")


def _loader(spec: str):
    if ":" not in spec:
        return globals()[spec]
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def serve(requests, answer) -> None:
    import numpy as np

    timer, run = _timer(), None
    for line in requests:
        request = json.loads(line)
        try:
            if "load" in request:
                x = np.load(request["input"])
                start = time.perf_counter()
                run, precision = _loader(request["load"])(request["model"], x, request["threads"],
                                                          request.get("options", {}))
                output = run()
                warmup_s = time.perf_counter() - start
                np.save(request["output"], np.asarray(output, dtype=np.float32))
                reply = {"pid": os.getpid(), "precision": precision, "warmup_s": warmup_s}
            elif "calibrate" in request:
                reply = {"number": timer.calibrate(run, request["calibrate"])}
            else:
                samples, errors = timer.interleaved({"run": run}, 1, {"run": request["block"]})
                if errors:
                    raise errors["run"]
                reply = {"seconds": samples["run"][0]}
        except Exception as error:  # noqa: BLE001 -- one line to the parent, which reports it
            traceback.print_exc(file=sys.stderr)
            reply = {"error": _one_line(error)}
        answer(json.dumps(reply))


if __name__ == "__main__":
    sys.path[:] = [path for path in sys.path if Path(path or ".").resolve() != Path(__file__).parent.resolve()]

    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever a runtime prints goes to the log, not into the answers

    def answer(text: str) -> None:
        answers.write(text + "\n")
        answers.flush()
    serve(sys.stdin, answer)
