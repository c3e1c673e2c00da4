"""`sepconv bench` and `sepconv.benchmark`: end to end on tiny models (no timing assertions: the machines are
shared), the suites' rows, the report, Ctrl-C, and one-line user errors found before any work."""

import json
import os
import sys

import pytest
import torch
from torch import nn

import sepconv
import stand_in_runtimes
from sepconv import cli, kernels
from sepconv.benchmark import (Case, RowResult, Timing, depthwise_suite, layer_cases, model_cases, runner, runtimes,
                               select)

ORT = "onnxruntime"


def tiny_net():
    return nn.Sequential(sepconv.SeparableConv2d(1, 4, 3, padding="same"), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3))


TINY = f"{__name__}:tiny_net"


def run(argv, capsys) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def table_rows(out: str) -> dict[str, list[str]]:
    """candidate -> the table line's cells, for the lines of the table."""
    lines = out.split("\n\n")[0].splitlines()[3:]
    return {line.split()[1]: line.split() for line in lines}


def test_bench_model_end_to_end(tmp_path, capsys):
    pytest.importorskip(ORT)
    out = tmp_path / "bench"
    code, stdout, stderr = run(["bench", TINY, "--input", "2x1x8x8", "--quick", "--rounds", "2", "--threads", "1",
                                "--candidates", "eager_nchw,eager_cl,sepconv,optimized,onnxruntime", "--out",
                                str(out)], capsys)
    assert code == 0, stderr
    rows = table_rows(stdout)
    assert list(rows) == ["eager_nchw", "eager_cl", "sepconv", "optimized", ORT]
    for name in ("eager_nchw", "eager_cl", "sepconv", ORT):
        assert rows[name][2] == "fp32" and float(rows[name][3]) > 0 and rows[name][4] == "±", rows[name]
    assert "x eager" in stdout and "x ort" in stdout and "x openvino" in stdout and "roof %" in stdout
    assert "2 rounds, each runtime in its own process" in stdout and "1 threads" in stdout
    result = json.loads((out / "results.json").read_text())
    assert result["meta"]["pass"] == "infer" and result["meta"]["threads"] == 1
    (row,) = result["rows"]
    assert row["name"] == TINY and row["input_shape"] == [2, 1, 8, 8] and row["flops"] > 0
    assert row["roofline_ms"] > 0
    for name in ("eager_nchw", "eager_cl", "sepconv", ORT):
        timing = row["candidates"][name]
        assert timing["error"] is None and timing["median_ms"] > 0 and timing["rounds"] == 2
        assert timing["max_error"] <= runner.AGREEMENT
        assert timing["speedup_vs"]["eager"] > 0 and timing["speedup_vs"][ORT] > 0
        assert (timing["pid"] == os.getpid()) == (name != ORT), name  # ORT alone in its own process
    optimized = row["candidates"]["optimized"]  # fails (with its reason) until sepconv.optimize_for_inference exists
    assert (optimized["error"] is None) == hasattr(sepconv, "optimize_for_inference")
    assert optimized["error"] is None or "\n" not in optimized["error"]
    assert (out / "table.txt").read_text() == stdout
    assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in stderr and "round" in stderr  # the report files, and the progress bar


def test_bench_train_step_on_a_registered_model(capsys):
    code, stdout, stderr = run(["bench", "digits_cnn", "--input", "2x1x8x8", "--train", "--quick", "--rounds", "1",
                                "--candidates", "eager_nchw,sepconv"], capsys)
    assert code == 0, stderr
    assert "sepconv bench: train (MODEL digits_cnn)" in stdout and "one training step" in stdout
    assert list(table_rows(stdout)) == ["eager_nchw", "sepconv"]


def test_bench_compile_candidate(capsys):
    code, stdout, stderr = run(["bench", TINY, "--input", "1x1x8x8", "--quick", "--rounds", "1",
                                "--candidates", "eager_nchw,compile"], capsys)
    assert code == 0, stderr
    rows = table_rows(stdout)
    assert rows["compile"][3] != "failed", stdout
    assert rows["compile"][7] == "1.00"  # its own x compile column (cells: row, name, precision, median, ±, IQR,
    # x eager, x compile, ...)


def test_a_failing_candidate_is_recorded_and_the_others_go_on(capsys, monkeypatch):
    real = runner.build_candidate

    def build(name, *args, **kwargs):
        if name == "eager_cl":
            raise RuntimeError("no kernel for this\nsecond line")
        return real(name, *args, **kwargs)
    monkeypatch.setattr(runner, "build_candidate", build)
    code, stdout, stderr = run(["bench", TINY, "--input", "1x1x8x8", "--quick", "--rounds", "1",
                                "--candidates", "eager_nchw,eager_cl"], capsys)
    assert code == 0, stderr
    assert table_rows(stdout)["eager_cl"][3] == "failed"
    assert f"  {TINY} eager_cl: RuntimeError: no kernel for this\n" in stdout


def test_layer_suite_row(capsys):
    code, stdout, stderr = run(["bench", "--suite", "--filter", "mnv2.l", "--quick", "--rounds", "1"], capsys)
    assert code == 0, stderr
    assert "depthwise layer suite" in stdout
    assert list(table_rows(stdout)) == ["eager_nchw", "eager_cl", "sepconv"]
    assert stdout.splitlines()[3].split()[0] == "dw.mnv2.l.b1"


def test_separable_suite_row_with_the_per_layout_and_forced_cpu_candidates(capsys):
    code, stdout, stderr = run(["bench", "--suite", "separable", "--filter", "sep.tiny.b[1]", "--quick", "--rounds", "1",
                                "--candidates", "eager_nchw,sepconv_nchw,sepconv_cl,cpu_nchw,cpu_cl"], capsys)
    assert code == 0, stderr
    assert "separable layer suite" in stdout
    rows = table_rows(stdout)
    assert list(rows) == ["eager_nchw", "sepconv_nchw", "sepconv_cl", "cpu_nchw", "cpu_cl"]
    assert all(cells[0] == "sep.tiny.b1" and cells[3] != "failed" for cells in rows.values()), stdout


class Recorder(nn.Module):
    """A 1x1 convolution that records, for each call, the kernels mode, whether its input is channels_last, and
    the input itself."""

    calls: list = []  # a class attribute: every candidate's deep copy appends here

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        layout = "cl" if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else "nchw"
        Recorder.calls.append((kernels.get_kernels(), layout, x))
        return self.conv(x)


@pytest.mark.parametrize("input_grad", [True, False])
def test_candidates_run_in_their_mode_and_layout_and_layer_rows_train_with_the_input_gradient(input_grad,
                                                                                                  monkeypatch):
    monkeypatch.setattr(Recorder, "calls", [])
    candidates = ["eager_nchw", "eager_cl", "sepconv_nchw", "sepconv_cl", "cpu_nchw", "cpu_cl"]
    result = runner.run_case(Case("recorder", Recorder, (1, 2, 4, 4), input_grad=input_grad), candidates,
                             train=True, threads=1, rounds=1, block_s=1e-4, machine=None)
    assert all(timing.ok for timing in result.timings.values()), result.timings
    seen = {(mode, layout) for mode, layout, _ in Recorder.calls}
    assert seen == {("reference", "nchw"), ("reference", "cl"), ("auto", "nchw"), ("auto", "cl"), ("cpu", "nchw"),
                    ("cpu", "cl")}
    assert all(x.requires_grad == input_grad for _, _, x in Recorder.calls)
    step_inputs = {id(x): x for _, _, x in Recorder.calls[1:]}.values()  # the first call only looks at the output
    assert len(step_inputs) == len(candidates)  # one leaf each, in its own layout
    assert all(x.is_leaf and (x.grad is not None) == input_grad for x in step_inputs)


def test_the_per_layout_and_forced_cpu_candidates_are_on_request_only():
    for train in (False, True):
        assert not set(runner.default_candidates(train)) & runner.ON_REQUEST
    assert runner.ON_REQUEST <= set(runner.CANDIDATES)


def test_model_suite_row(capsys):
    code, stdout, stderr = run(["bench", "--models", "--filter", "eegnet", "--quick", "--rounds", "1",
                                "--candidates", "eager_nchw"], capsys)
    assert code == 0, stderr
    assert stdout.splitlines()[3].split()[:2] == ["eegnet.b1", "eager_nchw"]


def test_ctrl_c_keeps_the_finished_rows(tmp_path, capsys, monkeypatch):
    calls = []

    def run_case(case, candidates, **kwargs):
        calls.append(case.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return RowResult(case.name, case.input_shape, False, {"eager_nchw": Timing("eager_nchw", 1e-3, 1e-4, 3, 1)})
    monkeypatch.setattr(runner, "run_case", run_case)
    code, stdout, stderr = run(["bench", "--suite", "--filter", "mnv1.", "--quick", "--out", str(tmp_path)], capsys)
    assert code == 130, stderr
    assert "interrupted" in stdout.splitlines()[0] and "dw.mnv1.1.b1" in stdout
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["meta"]["interrupted"] is True and [row["name"] for row in result["rows"]] == ["dw.mnv1.1.b1"]


@pytest.mark.parametrize("argv, message", [
    (["bench", TINY, "--input", "2x1"], "argument --input: --input must be 3 or 4 or 5 positive sizes"),
    (["bench", TINY, "--input", "2x1x8x8", "--candidates", "eager,sepconv"],
     "--candidates 'eager,sepconv': unknown 'eager'; choose from eager_nchw, eager_cl, compile, sepconv"),
    (["bench", TINY, "--input", "2x1x8x8", "--train", "--candidates", "sepconv,onnxruntime"],
     "--candidates onnxruntime time inference only"),
    (["bench", TINY, "--input", "2x1x8x8", "--candidates", "compile", "--no-compile"],
     "--no-compile leaves no candidate"),
    (["bench", "--input", "2x1x8x8"], "give one of MODEL, --suite or --models"),
    (["bench", TINY, "--suite"], "give one of MODEL, --suite or --models"),
    (["bench", "--models", "--input", "2x1x8x8"], "--input is MODEL's input"),
    (["bench", TINY, "--filter", "mnv1"], "--filter selects rows of --suite or --models"),
    (["bench", "--suite", "--filter", "nothing*"], "--filter 'nothing*' selects no row"),
    (["bench", "--suite", "pointwise"], "--suite 'pointwise': unknown suite; choose from depthwise, separable"),
    (["bench", "--suite", "separable", "--filter", "mnv9"], "--filter 'mnv9' selects no row"),
    (["bench", "resnet50"], "MODEL 'resnet50': unknown model name"),
    (["bench", "digits_cnn", "--input", "2x3x8x8"], "MODEL 'digits_cnn' cannot run on --input 2x3x8x8: DigitsCNN "
                                                    "needs input of shape (N, 1, H, W)"),
    (["bench", TINY, "--threads", "0"], "argument --threads: must be an int from 1 to 4096; got '0'"),
])
def test_usage_errors_are_one_line_before_any_work(argv, message, capsys, monkeypatch):
    monkeypatch.setattr("sepconv.profiling.timing.measure_machine", lambda: pytest.fail("work began"))
    code, stdout, stderr = run(argv, capsys)
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and message in stderr, stderr


def test_out_must_be_new_or_empty_unless_forced(tmp_path, capsys, monkeypatch):
    (tmp_path / "old.txt").write_text("keep")
    monkeypatch.setattr("sepconv.profiling.timing.measure_machine", lambda: pytest.fail("work began"))
    code, stdout, stderr = run(["bench", TINY, "--input", "1x1x8x8", "--out", str(tmp_path)], capsys)
    assert code == 2 and stdout == "" and stderr.count("\n") == 1
    assert "the folder exists and is not empty; pass --force" in stderr
    (tmp_path / "file").write_text("")
    code, _, stderr = run(["bench", TINY, "--out", str(tmp_path / "file")], capsys)
    assert code == 2 and "is a file, not a folder" in stderr
    assert (tmp_path / "old.txt").read_text() == "keep"


# --- the package ---------------------------------------------------------------------------------------

def test_speedups_and_roofline_share():
    timings = {name: Timing(name, seconds, 0.0, 3, 1) for name, seconds in
               (("eager_nchw", 4e-3), ("eager_cl", 2e-3), ("compile", 1e-3), ("sepconv", 5e-4))}
    timings["onnxruntime"] = Timing("onnxruntime", error="missing")
    timings["openvino"] = Timing("openvino", 2.5e-4, 0.0, 3, 1, precision="bf16")
    result = RowResult("row", (1, 3, 8, 8), False, timings, roofline_s=1e-4)
    speedups = result.speedups()
    assert speedups["sepconv"] == {"eager": 4.0, "compile": 2.0, "onnxruntime": None, "openvino": 0.5}
    assert speedups["eager_nchw"]["eager"] == 0.5 and speedups["onnxruntime"]["eager"] is None
    assert result.roofline_share("sepconv") == pytest.approx(0.2)
    assert result.as_dict()["candidates"]["compile"]["median_ms"] == 1.0


def test_suites():
    shapes = depthwise_suite([1, 32])
    assert len(shapes) == 30 == len(set(shapes)) and {s.n for s in shapes if s.name == "replknet.k31"} == {1, 8}
    assert {s.n for s in shapes if s.name == "x3d.res4"} == {1} and {s.n for s in shapes if s.name == "x3d.res3"} == {1, 8}
    assert all(isinstance(s.build(), sepconv.DepthwiseConv3d) for s in shapes if len(s.spatial) == 3)
    assert [case.name for case in select(layer_cases((1,)), "k31")] == ["dw.replknet.k31.b1"]
    separable = [case.name for case in layer_cases((1, 32), "separable")]
    assert len(separable) == 28 and {"sep.mnv1.1.b1", "sep.mnv1.9.b32", "sep.vol3d.b1", "sep.tiny.b1"} <= set(separable)
    assert all(case.input_grad for case in layer_cases((1,), "separable") + layer_cases((1,)))
    assert not any(case.input_grad for case in model_cases(quick=True))
    names = [case.name for case in model_cases()]
    for model in ("mobilenet_v1_100", "mobilenet_v1_050", "mobilenet_v2", "xception", "vgg_cifar",
                  "vgg_cifar_standard", "convnext_k7", "replknet_k31"):
        assert {f"{model}.b1", f"{model}.b16"} <= set(names), model
    assert {"x3d_xs.b1", "x3d_xs.b8"} <= set(names)
    assert {"eegnet.b1", "eegnet.b32"} <= set(names)
    assert [case.name for case in model_cases(quick=True)] == [name for name in names if name.endswith(".b1")]
    assert [case.name for case in select(model_cases(), "mobilenet_v1*")] == [
        "mobilenet_v1_100.b1", "mobilenet_v1_100.b16", "mobilenet_v1_050.b1", "mobilenet_v1_050.b16"]


@pytest.mark.parametrize("case", [case for case in model_cases(quick=True)], ids=lambda case: case.name)
def test_every_model_row_builds_for_its_input(case):
    with torch.device("meta"):
        model = case.build()
    model._check_input(torch.empty(case.input_shape, device="meta"))
    if case.name.startswith("vgg_cifar_standard"):
        assert not model.separable


@pytest.mark.parametrize("case", layer_cases((1,), "separable"), ids=lambda case: case.name)
def test_every_separable_row_builds_for_its_input(case):
    with torch.device("meta"):
        layer = case.build()
        output = layer(torch.empty(case.input_shape))
    assert output.shape[:2] == (1, layer.out_channels)


def test_channels_last_keeps_values_for_every_rank():
    for shape in ((2, 3, 5), (2, 3, 4, 5), (2, 3, 2, 4, 5)):
        x = torch.randn(shape)
        y = runner.channels_last(x)
        assert torch.equal(x, y) and y.stride(1) == 1


def test_import_sepconv_and_its_command_line_do_not_import_the_benchmark():
    import subprocess
    code = ("import sys, sepconv, sepconv.cli; "
            "print([m for m in sys.modules if m.startswith(('sepconv.benchmark', 'onnx', 'matplotlib'))])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr[-2000:]


def test_a_missing_extra_is_one_line(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # imports as if not installed
    monkeypatch.setattr("sepconv.profiling.timing.measure_machine", lambda: pytest.fail("work began"))
    code, stdout, stderr = run(["bench", TINY, "--input", "1x1x8x8"], capsys)
    assert code == 2 and stdout == ""
    assert stderr == "sepconv bench: error: sepconv bench needs tqdm, which is not installed: pip install " \
                     "'sepconv[bench]'\n"


def test_a_runtime_not_installed_is_skipped_in_one_line_and_the_table_goes_on(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, ORT, None)  # imports as if not installed
    monkeypatch.setitem(sys.modules, "openvino", None)
    code, stdout, stderr = run(["bench", TINY, "--input", "1x1x8x8", "--quick", "--rounds", "1"], capsys)
    assert code == 0, stderr
    rows = table_rows(stdout)
    assert rows["onnxruntime"][3] == rows["openvino"][3] == rows["openvino_f32"][3] == "skipped"
    assert float(rows["eager_nchw"][3]) > 0 and float(rows["optimized"][3]) > 0
    assert (f"skipped:\n  {TINY} onnxruntime: needs onnxruntime, which is not installed: pip install "
            f"'sepconv[bench]'\n  {TINY} openvino: needs openvino, ") in stdout
    assert "failed:" not in stdout


# --- runtime candidates in their own processes, with stand-ins (tests/stand_in_runtimes.py) ---------------

@pytest.fixture
def stand_ins():
    pytest.importorskip("onnx")
    names = ("ticking", "hanging", "crashing")
    for name in names:
        runtimes.register_runtime(name, runtimes.Runtime(f"stand_in_runtimes:{name}", ("onnx",)))
    yield
    for name in names:
        runtimes.unregister_runtime(name)


def test_a_runtime_runs_alone_in_its_own_process_which_times_it(stand_ins):
    result = runner.run_case(Case("tiny", tiny_net, (2, 1, 8, 8)), ["eager_nchw", "ticking"], train=False,
                             threads=1, rounds=3, block_s=0.05, machine=None)
    eager, ticking = result.timings["eager_nchw"], result.timings["ticking"]
    assert eager.ok and ticking.ok, result.timings
    assert eager.pid == os.getpid() and ticking.pid not in (None, os.getpid())
    # The stand-in's clock moves 0.25 s per call in its own process alone (no torch there): so the calibration
    # (one call per block) and every time came from that process's clock.
    assert ticking.calls_per_block == 1 and ticking.rounds == 3
    assert ticking.median_s == stand_in_runtimes.CALL_S and ticking.iqr_s == 0
    assert ticking.precision == "fake8" and ticking.max_error < 1e-5 and ticking.top1 == 1.0
    assert result.speedups()["eager_nchw"]["eager"] == 1.0


def test_a_runtime_past_its_time_limit_or_dying_is_reported_and_the_table_goes_on(stand_ins, capsys):
    code, stdout, stderr = run(["bench", TINY, "--input", "1x1x8x8", "--quick", "--rounds", "3", "--timeout", "8",
                                "--candidates", "eager_nchw,hanging,crashing,ticking"], capsys)
    assert code == 0, stderr
    rows = table_rows(stdout)
    assert rows["hanging"][3] == rows["crashing"][3] == "failed"
    assert float(rows["eager_nchw"][3]) > 0 and float(rows["ticking"][3]) == 1e3 * stand_in_runtimes.CALL_S
    assert f"  {TINY} hanging: no answer within 8 s (loading its model); its process was stopped\n" in stdout
    assert (f"  {TINY} crashing: its process exited with code 3 while timing 1 calls: stand-in runtime: out of "
            "luck\n") in stdout


def test_runtime_options_reach_the_loader_and_ort_spins_by_default(monkeypatch):
    pytest.importorskip(ORT)
    seen = []
    real = runtimes.Worker.load

    def load(self, model, x, output, threads, options):
        seen.append(options)
        return real(self, model, x, output, threads, options)
    monkeypatch.setattr(runtimes.Worker, "load", load)
    for argv, spinning in (([], True), (["--no-spin"], False)):
        assert cli.main(["bench", TINY, "--input", "1x1x8x8", "--quick", "--rounds", "1",
                         "--candidates", "onnxruntime", *argv]) == 0
        assert seen.pop() == {"spinning": spinning}


def test_bf16_candidate_and_rows_report_their_precision_and_error(capsys):
    code, stdout, stderr = run(["bench", TINY, "--input", "4x1x8x8", "--quick", "--rounds", "1",
                                "--candidates", "eager_nchw,optimized,optimized_bf16"], capsys)
    assert code == 0, stderr
    rows = table_rows(stdout)
    assert rows["optimized"][2] == "fp32" and rows["optimized"][-3:-1] == ["-", "-"]  # max err, top-1 %: below fp32
    assert rows["optimized_bf16"][2] == "bf16" and float(rows["optimized_bf16"][3]) > 0
    assert float(rows["optimized_bf16"][-3]) <= runner.REDUCED_AGREEMENT and rows["optimized_bf16"][-2] != "-"
    code, stdout, stderr = run(["bench", "--suite", "separable", "--filter", "sep.tiny.b1*", "--quick", "--rounds", "1"],
                               capsys)
    assert code == 0, stderr
    lines = [line.split() for line in stdout.split("\n\n")[0].splitlines()[3:]]
    assert {(cells[0], cells[2]) for cells in lines} == {("sep.tiny.b1", "fp32"), ("sep.tiny.b1.bf16", "bf16")}
