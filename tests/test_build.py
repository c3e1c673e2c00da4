"""Building the C++ kernels: said on stderr, never blocked by a killed build, never loaded on another CPU's cache,
buildable ahead of time with ``sepconv build`` (issue 25).

The process tests build a stand-in extension (one tiny source, about a second) through the same code as the
kernels; a compiler wrapper that sleeps makes a build last long enough to be caught half-way. One test builds
the real kernels end to end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sepconv.kernels import cpu
from sepconv.kernels.cpu import build

ROOT = Path(__file__).resolve().parent.parent
STANDIN = textwrap.dedent("""\
    #include <Python.h>
    #define INIT_(name) PyInit_##name
    #define INIT(name) INIT_(name)
    static PyModuleDef definition = {PyModuleDef_HEAD_INIT, "stand-in", nullptr, -1, nullptr};
    PyMODINIT_FUNC INIT(TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&definition); }
    """)
LOAD = ("import sys; from sepconv.kernels.cpu import build; "
        "build.load_or_build(build.Extension('standin', (sys.argv[1],), description='the stand-in')); print('loaded')")


@pytest.fixture
def standin(tmp_path):
    """The stand-in's source, an empty cache for it and a compiler wrapper that sleeps 4 s before compiling."""
    source = tmp_path / "standin.cpp"
    source.write_text(STANDIN)
    slow = tmp_path / "slow-c++"
    slow.write_text('#!/bin/sh\ncase "$*" in *" -c "*) sleep 4;; esac\nexec c++ "$@"\n')
    slow.chmod(0o755)
    env = {**os.environ, "SEPCONV_BUILD_DIR": str(tmp_path / "cache"), "SEPCONV_BUILD_WAIT": "120",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # this checkout's sepconv
    env.pop("CXX", None)
    return source, env, {**env, "CXX": str(slow)}


def start(source, env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", LOAD, str(source)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(process: subprocess.Popen, timeout: float = 120) -> tuple[str, str]:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err
    assert out.strip() == "loaded"
    return out, err


def the_record(env) -> Path:
    (record,) = Path(env["SEPCONV_BUILD_DIR"]).glob("standin/*/build.json")
    return record


def test_a_first_build_says_so_while_it_runs_and_a_warm_cache_says_nothing(standin):
    source, env, slow_env = standin
    process = start(source, slow_env)
    first_line = process.stderr.readline()
    assert process.poll() is None, "the message comes before the build ends, not after"
    assert first_line.startswith("sepconv: building the stand-in for this CPU") and "cached in" in first_line
    _, rest = finish(process)
    assert rest.startswith("sepconv: built the stand-in in ")
    _, err = finish(start(source, env))
    assert err == ""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_build_killed_half_way_does_not_block_the_next_process(standin, sig):
    source, env, slow_env = standin
    victim = start(source, slow_env)
    assert victim.stderr.readline().startswith("sepconv: building")
    victim.send_signal(sig)
    victim.wait(timeout=30)
    began = time.monotonic()
    _, err = finish(start(source, env))
    assert "sepconv: built the stand-in" in err and time.monotonic() - began < 100
    assert not [p for p in the_record(env).parent.iterdir() if p.name.startswith("attempt-")]


def test_two_torchrun_ranks_on_an_empty_cache_both_finish_and_one_builds(standin, tmp_path):
    source, _, slow_env = standin
    script = tmp_path / "rank.py"
    script.write_text(LOAD.replace("sys.argv[1]", repr(str(source))).replace("; ", "\n"))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script)], cwd=ROOT, env=slow_env, text=True, capture_output=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("loaded") == 2
    assert done.stderr.count("sepconv: building the stand-in") == 1
    assert "sepconv: waiting for process" in done.stderr


def test_a_cache_recorded_for_other_cpu_features_is_rebuilt_never_loaded(standin):
    source, env, _ = standin
    finish(start(source, env))
    record = the_record(env)
    fields = json.loads(record.read_text())
    fields["cpu_flags"] = ["sse2"]  # as if built on an older CPU sharing this home directory
    record.write_text(json.dumps(fields))
    (record.parent / "standin.so").write_bytes(b"not a library: loading it would fail")
    _, err = finish(start(source, env))
    assert err.startswith("sepconv: building the stand-in")
    assert json.loads(record.read_text())["cpu_flags"] == sorted(build.cpu_flags())


def test_the_key_names_what_the_binary_depends_on(monkeypatch):
    native = build.record(cpu.KERNELS, "native")
    assert native["cpu_flags"] == sorted(build.cpu_flags()) and "-march=native" in native["flags"]
    monkeypatch.setattr(build, "cpu_flags", lambda: frozenset({"sse2", "avx"}))
    assert build.record(cpu.KERNELS, "native")["key"] != native["key"]
    portable = build.record(cpu.KERNELS, "portable")
    assert portable["cpu_flags"] == [] and portable["key"] != native["key"]
    if build._family() == "x86":
        assert "-march=x86-64-v3" in portable["flags"]
        assert build.unusable_here("portable") == \
            "SEPCONV_ARCH=portable needs avx2, bmi1, bmi2, f16c, fma, movbe, which this CPU lacks"


def test_a_bad_arch_or_wait_is_one_line_naming_it(monkeypatch, capsys):
    from helpers import run_cli

    monkeypatch.setenv("SEPCONV_ARCH", "fastest")
    with pytest.raises(build.BuildError, match="SEPCONV_ARCH must be one of 'native', 'portable'; got 'fastest'"):
        build.load_or_build(cpu.KERNELS)
    code, out, err = run_cli(["build", "--check"], capsys)
    assert code == 2 and out == "" and err.strip().count("\n") == 0 and "got 'fastest'" in err
    monkeypatch.setenv("SEPCONV_ARCH", "native")
    monkeypatch.setenv("SEPCONV_BUILD_WAIT", "soon")
    with pytest.raises(build.BuildError, match="SEPCONV_BUILD_WAIT must be a number of seconds; got 'soon'"):
        build._wait_limit()


def test_sepconv_build_check_reports_an_empty_cache_and_build_fills_it(tmp_path):
    """The real kernels, end to end: --check on an empty cache, a build, then --check and a fresh process's call."""
    env = {**os.environ, "SEPCONV_BUILD_DIR": str(tmp_path)}

    def sepconv(*argv):
        return subprocess.run([sys.executable, "-m", "sepconv", *argv], cwd=ROOT, env=env, text=True,
                              capture_output=True, timeout=600)

    empty = sepconv("build", "--check")
    assert empty.returncode == 1 and "kernels: not usable: not built yet" in empty.stdout and "(empty)" in empty.stdout
    built = sepconv("build")
    assert built.returncode == 0, built.stderr
    assert "sepconv: building the C++ CPU kernels" in built.stderr and "kernels: usable" in built.stdout
    check = sepconv("build", "--check")
    assert check.returncode == 0 and check.stderr == ""
    for line in ("kernels: usable", "arch: native", "CPU vector features: ", "compiler: ", f"cache: {tmp_path}"):
        assert line in check.stdout
    call = subprocess.run([sys.executable, "-c", "import torch, sepconv.functional as F; from sepconv.kernels import "
                           "cpu; F.depthwise_conv(torch.randn(1, 8, 9, 9), torch.randn(8, 1, 3, 3)); "
                           "print(cpu.kernel_calls() > 0)"], cwd=ROOT, env=env, text=True, capture_output=True,
                          timeout=120)
    assert call.stdout.strip() == "True" and call.stderr == ""


@pytest.mark.skipif(not cpu.available(), reason=f"C++ backend not built: {cpu.failure()}")
def test_torch_compile_fullgraph_as_the_first_use_of_the_kernels():
    """Defect: the lazy load ran under a lock inside the traced code ("Unsupported context manager")."""
    script = ("import torch, sepconv\n"
              "from sepconv.kernels import cpu\n"
              "layer = sepconv.DepthwiseConv2d(32, 7, padding='same')\n"
              "x = torch.randn(1, 32, 16, 16)\n"
              "out = torch.compile(layer, fullgraph=True)(x)\n"
              "calls = cpu.kernel_calls()\n"
              "torch.testing.assert_close(out, layer(x))\n"
              "print(calls > 0)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, text=True, capture_output=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr[-2000:]
