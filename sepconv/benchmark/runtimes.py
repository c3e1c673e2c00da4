"""Candidates run by another runtime (onnxruntime, OpenVINO), each alone in its own worker process.

Another runtime's thread pool keeps spinning after its work, as PyTorch's OpenMP threads do; sharing a process or
a moment with them takes the cores from whoever runs next (measured: ORT looked 2x slower after PyTorch). So each
runtime candidate gets a worker process (:mod:`~sepconv.benchmark.worker`, which never imports torch) that loads
the row's model exported once to ONNX, and the runner hands the cores to one process at a time. A runtime whose
packages are missing is skipped with the extra to install; one that fails or does not answer within its time
limit is reported as such.
"""

from __future__ import annotations

import importlib.util
import json
import os
import select
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = ["RUNTIMES", "Runtime", "RuntimeFailed", "Worker", "export_onnx", "missing", "register_runtime", "unregister_runtime"]

WORKER = Path(__file__).with_name("worker.py")


class RuntimeFailed(Exception):
    """A runtime candidate's worker failed or did not answer in time; the message is one line."""


@dataclass(frozen=True)
class Runtime:
    """How a worker runs a candidate: ``loader`` is a loader of :mod:`~sepconv.benchmark.worker` by name or
    ``module:function`` (importable in a fresh process); ``modules`` are what it needs, which ``extra`` installs."""

    loader: str
    modules: tuple[str, ...] = ()
    extra: str = "bench"


RUNTIMES: dict[str, Runtime] = {
    "onnxruntime": Runtime("onnxruntime", ("onnx", "onnxruntime")),
    "openvino": Runtime("openvino", ("onnx", "openvino")),  # its default precision hint: bf16 where the CPU has it
    "openvino_f32": Runtime("openvino_f32", ("onnx", "openvino")),
}


def register_runtime(name: str, runtime: Runtime) -> None:
    """Make ``name`` a runtime candidate of the runner (e.g. a stand-in in tests)."""
    if not name.isidentifier():
        raise ValueError(f"name={name!r}: a runtime's name is an identifier")
    RUNTIMES[name] = runtime


def unregister_runtime(name: str) -> None:
    RUNTIMES.pop(name, None)


def missing(name: str) -> str | None:
    """Why runtime ``name`` cannot run here (one line naming the extra to install), or ``None``."""
    runtime = RUNTIMES[name]
    absent = [module for module in runtime.modules if not _installed(module)]
    if not absent:
        return None
    return f"needs {', '.join(absent)}, which is not installed: pip install 'sepconv[{runtime.extra}]'"


def _installed(module: str) -> bool:
    if module in sys.modules:  # None there marks it as not importable
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def export_onnx(model: nn.Module, x: torch.Tensor, path: Path) -> Path:
    """``model`` (in eval mode) traced on ``x`` into an ONNX file at ``path``, which every runtime reads."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings
        torch.onnx.export(model.eval(), (x,), str(path), dynamo=False, opset_version=17)
    return path


class Worker:
    """One runtime candidate's process: load it, then calibrate and time blocks on request. Every request waits
    at most ``timeout_s`` for its answer; past it the process is killed and :class:`RuntimeFailed` raised."""

    def __init__(self, name: str, timeout_s: float):
        self.name, self.timeout_s = name, timeout_s
        self.pid: int | None = None
        self._log = tempfile.TemporaryFile(mode="w+")  # its stderr: the last line explains a crash
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
        self._process = subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=self._log, env=env)
        self._pending = b""

    def load(self, model: Path, x: Path, output: Path, threads: int, options: dict) -> dict:
        reply = self._ask({"load": RUNTIMES[self.name].loader, "model": str(model), "input": str(x),
                           "output": str(output), "threads": threads, "options": options}, "loading its model")
        self.pid = reply["pid"]
        return reply

    def calibrate(self, block_s: float) -> int:
        return self._ask({"calibrate": block_s}, "calibrating")["number"]

    def block(self, number: int) -> float:
        """Per-call seconds of ``number`` calls, timed in the worker."""
        return self._ask({"block": number}, f"timing {number} calls")["seconds"]

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.stdin.close()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process.stdout.close()
        self._log.close()

    def _ask(self, request: dict, what: str) -> dict:
        try:
            self._process.stdin.write((json.dumps(request) + "\n").encode())
            self._process.stdin.flush()
        except BrokenPipeError:
            raise RuntimeFailed(self._exited(what)) from None
        reply = json.loads(self._read_line(what))
        if "error" in reply:
            raise RuntimeFailed(reply["error"])
        return reply

    def _read_line(self, what: str) -> bytes:
        deadline = time.monotonic() + self.timeout_s
        fd = self._process.stdout.fileno()
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self._process.kill()
                self._process.wait()
                raise RuntimeFailed(f"no answer within {self.timeout_s:g} s ({what}); its process was stopped")
            chunk = os.read(fd, 65536)
            if not chunk:
                self._process.wait()
                raise RuntimeFailed(self._exited(what))
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line

    def _exited(self, what: str) -> str:
        self._process.wait()
        self._log.seek(0)
        lines = [line.strip() for line in self._log.read().splitlines() if line.strip()]
        last = f": {lines[-1][:200]}" if lines else ""
        return f"its process exited with code {self._process.returncode} while {what}{last}"
