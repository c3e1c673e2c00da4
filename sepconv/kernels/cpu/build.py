"""Building and caching the C++ kernels: said on stderr, at most one build per key at a time, never loaded on a CPU
they were not built for.

A build lives in ``<root>/<name>/<arch>-<key>/`` (root: ``SEPCONV_BUILD_DIR``, else PyTorch's extensions
directory). The key hashes everything the binary depends on: the sources, the compiler flags, torch, Python, the
machine and, for ``-march=native``, this CPU's instruction-set flags. ``build.json`` is written after the library
and records the key; a directory whose record differs from this process's key is never loaded, it is rebuilt.

Processes agree through an ``flock`` on ``<dir>/lock``: the kernel drops it when its owner dies (SIGKILL included),
so a killed build never blocks the next process, which rebuilds in a directory of its own (``attempt-<host>-<pid>``,
so an orphaned compiler can't write into it). A live builder is waited for, with a message, up to
``SEPCONV_BUILD_WAIT`` seconds (default 900).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

try:
    import fcntl
except ImportError:  # Windows: builds are not serialised between processes
    fcntl = None

ARCHES = ("native", "portable")
# -march for SEPCONV_ARCH=portable: AVX2 and FMA, every x86 server CPU since 2013 (x86-64-v3); ARMv8 on ARM
_PORTABLE = {"x86": ("-march=x86-64-v3", {"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"}),
             "arm": ("-march=armv8-a", set())}
# the instruction-set flags a report shows (the key uses every flag the CPU reports)
_VECTOR_FLAGS = re.compile(r"^(sse4_2|avx.*|fma|f16c|amx.*|asimd.*|sve.*|neon|bf16|i8mm)$")
DEFAULT_WAIT_S = 900


class BuildError(RuntimeError):
    """The kernels could not be built or loaded; the message is one line that says why."""


@dataclasses.dataclass(frozen=True)
class Extension:
    """A C++ extension built by :func:`torch.utils.cpp_extension.load`: the kernels, or a stand-in in tests."""
    name: str
    sources: tuple[str, ...]
    headers: tuple[str, ...] = ()
    description: str = "the C++ CPU kernels"


def arch() -> str:
    """``SEPCONV_ARCH``: ``native`` (default: this CPU's whole instruction set) or ``portable`` (AVX2/FMA)."""
    value = os.environ.get("SEPCONV_ARCH", "native").strip().lower() or "native"
    if value not in ARCHES:
        raise ValueError(f"SEPCONV_ARCH must be one of {', '.join(map(repr, ARCHES))}; got {value!r}")
    return value


def _family() -> str:
    return "arm" if platform.machine().lower() in ("arm64", "aarch64") else "x86"


def flags(target: str) -> list[str]:
    if target == "native":
        march = "-mcpu=native" if _family() == "arm" else "-march=native"
    else:
        march = _PORTABLE[_family()][0]
    # -fopenmp compiles at::parallel_for's parallel region; libgomp resolves to the copy PyTorch already loaded
    return ["-O3", march, "-fno-math-errno", "-fopenmp"]


def cpu_flags() -> frozenset[str]:
    """The instruction-set flags this CPU reports (Linux ``/proc/cpuinfo``; elsewhere the compiler's view of
    ``-march=native``)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                field, _, value = line.partition(":")
                if field.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    macros = subprocess.run([_compiler(), "-march=native", "-dM", "-E", "-x", "c++", os.devnull],
                            capture_output=True, text=True, check=False).stdout
    return frozenset(m.lower() for m in re.findall(r"#define __([A-Z0-9_]+)__ 1", macros))


def vector_flags(features) -> list[str]:
    return sorted(f for f in features if _VECTOR_FLAGS.match(f))


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def compiler_version() -> str:
    """The first line of ``$CXX --version`` (what a bug report needs), or why there is none."""
    try:
        done = subprocess.run([_compiler(), "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"none usable ({_compiler()}: {error.strerror if isinstance(error, OSError) else 'timed out'})"
    return (done.stdout.splitlines() or ["unknown"])[0]


def root() -> str:
    explicit = os.environ.get("SEPCONV_BUILD_DIR") or os.environ.get("TORCH_EXTENSIONS_DIR")
    if explicit:
        return explicit
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "torch_extensions")


def record(extension: Extension, target: str | None = None) -> dict:
    """Everything the binary depends on, as ``build.json`` records it; ``key`` hashes the rest."""
    import torch

    target = target or arch()
    sources = hashlib.sha256()
    for path in (*extension.sources, *extension.headers):
        with open(path, "rb") as file:
            sources.update(os.path.basename(path).encode() + b"\0" + file.read())
    fields = {"name": extension.name, "arch": target, "flags": flags(target), "sources": sources.hexdigest(),
              "torch": torch.__version__, "python": sys.implementation.cache_tag, "machine": platform.machine(),
              "cpu_flags": sorted(cpu_flags()) if target == "native" else []}
    fields["key"] = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return fields


def directory(fields: dict) -> str:
    return os.path.join(root(), fields["name"], f"{fields['arch']}-{fields['key']}")


def unusable_here(target: str) -> str | None:
    """Why a build for ``target`` cannot run on this CPU (a portable build needs AVX2/FMA), or None."""
    missing = sorted(_PORTABLE[_family()][1] - cpu_flags()) if target == "portable" else []
    return f"SEPCONV_ARCH=portable needs {', '.join(missing)}, which this CPU lacks" if missing else None


def finished_build(fields: dict) -> dict | None:
    """The record of a finished build for exactly these fields (see :func:`record`), or None."""
    try:
        with open(os.path.join(directory(fields), "build.json")) as file:
            recorded = json.load(file)
    except (OSError, ValueError):
        return None
    # built for another CPU, compiler flags or sources: never loaded
    return recorded if all(recorded.get(k) == v for k, v in fields.items()) else None


def load_built(extension: Extension, fields: dict | None = None):
    """The extension if a finished build for this process's key is cached, else None (nothing is built)."""
    fields = fields or record(extension)
    if finished_build(fields) is None:
        return None
    return _import(extension.name, os.path.join(directory(fields), extension.name + ".so"))


def _import(name: str, path: str):
    if name in sys.modules:  # one copy per process, whichever way it came
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def load_or_build(extension: Extension):
    """The extension, loaded from the cache or built (saying so on stderr) and cached; raises :class:`BuildError`."""
    try:
        target = arch()
    except ValueError as error:
        raise BuildError(str(error)) from None
    reason = unusable_here(target)
    if reason:
        raise BuildError(reason)
    fields = record(extension, target)
    module = load_built(extension, fields)
    if module is not None:
        return module
    folder = directory(fields)
    os.makedirs(folder, exist_ok=True)
    with _exclusive(os.path.join(folder, "lock"), extension):
        module = load_built(extension, fields)  # built by the process we waited for
        if module is None:
            module = _build(extension, fields, folder)
    return module


def _build(extension: Extension, fields: dict, folder: str):
    from torch.utils import cpp_extension

    for stale in os.listdir(folder):  # attempts of builders that died: we hold the lock, so none is live
        if stale.startswith("attempt-"):
            shutil.rmtree(os.path.join(folder, stale), ignore_errors=True)
    attempt = os.path.join(folder, f"attempt-{socket.gethostname()}-{os.getpid()}")
    os.makedirs(attempt)
    with _Progress(f"sepconv: building {extension.description} for this CPU ({fields['arch']}: "
                   f"{' '.join(flags(fields['arch'])[1:2])}); first use only, usually 1-2 minutes; cached in "
                   f"{folder}") as progress:
        try:
            module = cpp_extension.load(name=extension.name, sources=list(extension.sources),
                                        extra_cflags=fields["flags"], extra_ldflags=["-fopenmp"],
                                        build_directory=attempt, verbose=False)
        except Exception as error:
            progress.end("sepconv: the build failed")
            raise BuildError(cause(error)) from None
        os.replace(os.path.join(attempt, extension.name + ".so"), os.path.join(folder, extension.name + ".so"))
        recorded = {**fields, "compiler": compiler_version(), "built_s": round(progress.elapsed(), 1),
                    "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _write_atomically(os.path.join(folder, "build.json"), json.dumps(recorded, indent=1))
        progress.end(f"sepconv: built {extension.description} in {progress.elapsed():.0f} s")
    shutil.rmtree(attempt, ignore_errors=True)
    sys.modules[extension.name] = module
    return module


def _write_atomically(path: str, text: str) -> None:
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def cause(error: Exception) -> str:
    """The line of a build failure that says what went wrong (a compiler's first error), shortened to one line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    compiler = [line for line in lines if ": error" in line or ": fatal error" in line]
    text = (compiler or lines or [type(error).__name__])[0]
    return text if len(text) <= 300 else text[:297] + "..."


@contextlib.contextmanager
def _exclusive(path: str, extension: Extension):
    """Hold ``path``'s flock, waiting for a live holder (with a message) at most ``SEPCONV_BUILD_WAIT`` seconds."""
    limit = _wait_limit()
    with open(path, "a+") as lock:
        start, progress = time.monotonic(), None
        try:
            while not _try_flock(lock):
                if progress is None:
                    lock.seek(0)
                    owner = lock.read().strip() or "another process"
                    progress = _Progress(f"sepconv: waiting for {owner}, which is building {extension.description} "
                                         f"(up to {limit:.0f} s, SEPCONV_BUILD_WAIT)").__enter__()
                if time.monotonic() - start > limit:
                    raise BuildError(f"another process has been building {extension.description} for more than "
                                     f"{limit:.0f} s (SEPCONV_BUILD_WAIT); its lock is {path}")
                time.sleep(0.5)
        finally:
            if progress is not None:
                progress.end(f"sepconv: stopped waiting after {progress.elapsed():.0f} s")
        try:
            lock.seek(0)
            lock.truncate()
            lock.write(f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}")
            lock.flush()
            yield
        finally:
            lock.truncate(0)  # closing the file drops the flock


def _try_flock(lock) -> bool:
    if fcntl is None:
        return True
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _wait_limit() -> float:
    text = os.environ.get("SEPCONV_BUILD_WAIT", str(DEFAULT_WAIT_S))
    try:
        return max(0.0, float(text))
    except ValueError:
        raise BuildError(f"SEPCONV_BUILD_WAIT must be a number of seconds; got {text!r}") from None


class _Progress:
    """One line on stderr when work starts and one when it ends; on a terminal, the seconds elapsed in between."""

    def __init__(self, message: str):
        self.message, self.start, self.done = message, time.monotonic(), threading.Event()
        self.live = sys.stderr.isatty()

    def __enter__(self):
        print(self.message + (" ..." if self.live else ""), file=sys.stderr, flush=True)
        if self.live:
            threading.Thread(target=self._tick, daemon=True).start()
        return self

    def _tick(self):
        while not self.done.wait(1.0):
            print(f"\r  {self.elapsed():.0f} s", end="", file=sys.stderr, flush=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def end(self, message: str) -> None:
        if not self.done.is_set():
            self.done.set()
            print(("\r" if self.live else "") + message, file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        self.end("sepconv: interrupted" if exc[0] else "sepconv: done")
