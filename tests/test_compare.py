"""`sepconv compare`: the end-to-end run on the default dataset, resume, the datasets, DDP and user errors."""

import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sepconv.models.digits_cnn  # noqa: F401  (registers "digits_cnn")
from sepconv import cli
from sepconv.experiment import DataError, load_dataset
from sepconv.experiment import measure, report
from sepconv.experiment import train as train_module
from sepconv.experiment.data import CIFAR_FILES, eeg_synthetic_templates, make_eeg_synthetic
from sepconv.models import create_model
from helpers import write_cifar

TINY = ["--epochs", "2", "--batch-size", "64", "--threads", "1"]  # 23 batches per epoch on digits
BATCHES_PER_EPOCH = 23
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _figures(history):
    """Everything an epoch records except its wall time."""
    return [{key: value for key, value in record.items() if key != "seconds"} for record in history]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`sepconv` with no sub-command: compare on the default dataset (digits) and model, a tiny budget."""
    out = tmp_path_factory.mktemp("compare") / "run"
    code = cli.main([*TINY, "--out", str(out)])
    return code, out, json.loads((out / "metrics.json").read_text())


def test_default_run_writes_the_report_with_every_figure(default_run, capsys):
    code, out, metrics = default_run
    assert code == 0
    assert metrics["status"] == "complete"
    assert metrics["settings"]["model"] == "digits_cnn" and metrics["dataset"]["name"] == "digits"
    standard, separable = metrics["models"]["standard"], metrics["models"]["separable"]
    for model in (standard, separable):
        assert [record["epoch"] for record in model["epochs"]] == [1, 2]
        for key, batch in (("inference_ms", 256), ("train_step_ms", 64)):  # inference: the validation batch
            assert model[key]["median"] > 0 and model[key]["iqr"] >= 0 and model[key]["batch_size"] == batch
        assert model["seconds_per_epoch"]["median"] > 0
        assert model["train_validation_gap"] == pytest.approx(model["final_train_accuracy"]
                                                             - model["final_validation_accuracy"])
    comparison = metrics["comparison"]
    assert comparison["theoretical_speedup"] == pytest.approx(standard["macs"] / separable["macs"])
    assert comparison["inference_speedup"] == pytest.approx(standard["inference_ms"]["median"]
                                                            / separable["inference_ms"]["median"])
    assert comparison["inference_efficiency"] == pytest.approx(comparison["inference_speedup"]
                                                               / comparison["theoretical_speedup"])
    if measure.optimizer_for_inference() is not None:
        for model in (standard, separable):
            timing = model["optimized_inference_ms"]
            assert timing["median"] > 0 and timing["iqr"] >= 0 and timing["batch_size"] == 256
            assert model["optimized_inference"]["method"] and model["optimized_inference"]["max_abs_difference"] >= 0
        assert comparison["optimized_inference_speedup"] == pytest.approx(
            standard["optimized_inference_ms"]["median"] / separable["optimized_inference_ms"]["median"])
        assert comparison["optimized_inference_efficiency"] == pytest.approx(
            comparison["optimized_inference_speedup"] / comparison["theoretical_speedup"])
    else:  # said, not made up
        assert standard["optimized_inference_ms"] is None and comparison["optimized_inference_speedup"] is None
        assert "no optimize_for_inference" in standard["optimized_inference"]["reason"]

    machine = metrics["machine"]
    bandwidth, peak = machine["memory_bandwidth_bytes_per_second"], machine["peak_flops_per_second"]
    assert bandwidth > 0 and peak > 0 and machine["threads"] == 1
    for model in (standard, separable):
        times = model["layer_times"]
        assert times["batch_size"] == 256 and times["model_ms"] > 0
        assert [layer["name"] for layer in times["layers"]] == [layer["name"] for layer in model["layers"]]
        for layer in times["layers"]:
            assert layer["macs"] == 256 * next(row["macs"] for row in model["layers"] if row["name"] == layer["name"])
            assert layer["flops"] == 2 * layer["macs"] and layer["bytes"] > 0
            assert math.isfinite(layer["measured_ms"]) and layer["measured_ms"] > 0
            assert layer["roofline_ms"] == pytest.approx(1e3 * max(layer["bytes"] / bandwidth, layer["flops"] / peak))
            assert layer["roofline_share"] == pytest.approx(layer["roofline_ms"] / layer["measured_ms"])
            assert layer["bound"] == ("memory" if layer["bytes"] / bandwidth >= layer["flops"] / peak else "compute")
        assert times["measured_ms"] == pytest.approx(sum(layer["measured_ms"] for layer in times["layers"]))
        assert times["roofline_ms"] == pytest.approx(sum(layer["roofline_ms"] for layer in times["layers"]))
        assert times["uncounted_ms"] == pytest.approx(times["model_ms"] - times["measured_ms"])

    plots = [plot["file"] for plot in metrics["plots"]]
    assert {"curves.png", "layer_costs.png", "layer_times.png"} <= set(plots)
    assert "filters_separable_features_stem_conv.png" in plots  # spatially separable: 1-D kernels, surface
    assert "filters_separable_features_block1_conv_conv.png" in plots  # depthwise kernel grid
    for name in plots:
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
    markdown, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for figure in (f"{standard['params']:,}", f"{separable['macs']:,}",
                   f"{100 * separable['final_validation_accuracy']:.2f}",
                   f"{standard['inference_ms']['median']:.3f} ± {standard['inference_ms']['iqr']:.3f}",
                   f"{comparison['theoretical_speedup']:.2f}x", "Time per layer against the roofline",
                   f"{separable['layer_times']['layers'][0]['roofline_ms']:.4f}",
                   f"{standard['layer_times']['model_ms']:.4f} ± {standard['layer_times']['model_iqr_ms']:.4f}",
                   f"realised, inference as trained (eager): {comparison['inference_speedup']:.2f}x"):
        assert figure in markdown and figure in page
    assert page.count('src="data:image/png;base64,') == len(plots)  # self-contained
    assert all(f"]({name})" in markdown for name in plots)
    assert (out / "checkpoints" / "standard.pt").exists() and (out / "checkpoints" / "separable.pt").exists()


def test_separable_twin_is_cheaper_and_both_learn(default_run):
    _, _, metrics = default_run
    standard, separable = metrics["models"]["standard"], metrics["models"]["separable"]
    assert separable["params"] < standard["params"] / 5
    assert separable["macs"] < standard["macs"] / 5
    for model in (standard, separable):
        assert model["final_validation_accuracy"] > 0.5  # ten classes: chance is 0.1


@pytest.mark.parametrize("optimize, timed, reason", [
    (None, False, "this sepconv has no optimize_for_inference"),
    (lambda model, batch: model, True, None),
    (lambda model, batch: torch.nn.Sequential(model, torch.nn.ReLU()), False, "outputs differ from the model's"),
    (lambda model, batch: torch.nn.Flatten(), False, "not shaped like the model's"),
    (lambda model, batch: (_ for _ in ()).throw(NotImplementedError("no such layer")), False,
     "failed: NotImplementedError: no such layer"),
])
def test_optimized_inference_is_timed_only_when_it_computes_what_the_model_does(optimize, timed, reason,
                                                                                   monkeypatch):
    monkeypatch.setattr(measure, "optimizer_for_inference", lambda: optimize)
    monkeypatch.setattr(measure, "ROUNDS", 1)
    monkeypatch.setattr(measure, "MIN_RUN_SECONDS", 1e-3)
    torch.manual_seed(0)
    models = {twin: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)) for twin in ("a", "b")}
    times = measure.measure_times(models, torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]), 8, 1e-3)
    for result in times.values():
        assert result["inference_ms"]["median"] > 0 and result["inference_ms"]["batch_size"] == 256
        assert result["train_step_ms"]["batch_size"] == 8
        if timed:
            assert result["optimized_inference_ms"]["median"] > 0
            assert result["optimized_inference"]["max_abs_difference"] == 0
        else:
            assert result["optimized_inference_ms"] is None and result["optimized_inference"]["method"] is None
            assert reason in result["optimized_inference"]["reason"]


# --- bf16 beside fp32 ------------------------------------------------------------------------------

def test_default_run_reports_bf16_beside_fp32(default_run):
    _, out, metrics = default_run
    markdown = (out / "report.md").read_text()
    assert "## Inference in fp32 and bf16" in markdown
    comparison = metrics["comparison"]
    if not metrics["environment"]["native_bf16"]:  # said, not left out
        for twin in ("standard", "separable"):
            assert metrics["models"][twin]["bf16_inference_ms"] is None
            assert metrics["models"][twin]["bf16_inference"]["reason"] == measure.BF16_NOT_NATIVE
        assert comparison["bf16_inference_speedup"] is None and measure.BF16_NOT_NATIVE in markdown
        return
    for twin in ("standard", "separable"):
        model = metrics["models"][twin]
        timing, note = model["bf16_inference_ms"], model["bf16_inference"]
        assert timing["median"] > 0 and timing["iqr"] >= 0 and timing["batch_size"] == 256
        assert note["precision"] == "bf16" and "dtype=torch.bfloat16" in note["method"]
        assert note["validation_size"] == metrics["dataset"]["validation_size"]
        assert 0 <= note["validation_accuracy"] <= 1 and 0 <= note["fp32_validation_accuracy"] <= 1
        # the fp32 model here is the trained model in eval mode on the same set: its last epoch's figure
        assert note["fp32_validation_accuracy"] == pytest.approx(model["final_validation_accuracy"],
                                                                 abs=2 / note["validation_size"])
        assert note["top1_agreement"] >= 0.9  # bf16 rounding moves the logits by about 1 %
        assert 0 <= note["max_logit_error"] < 0.1
        assert model["bf16_vs_fp32_inference_speedup"] == pytest.approx(
            model["optimized_inference_ms"]["median"] / timing["median"])
        row = next(line for line in markdown.splitlines() if line.startswith(f"| {twin} "))
        for figure in (f"{timing['median']:.3f} ± {timing['iqr']:.3f}", f"{100 * note['validation_accuracy']:.2f}",
                       f"{100 * note['top1_agreement']:.2f}", f"{100 * note['max_logit_error']:.2f}%"):
            assert figure in row
    assert comparison["bf16_inference_speedup"] == pytest.approx(
        metrics["models"]["standard"]["bf16_inference_ms"]["median"]
        / metrics["models"]["separable"]["bf16_inference_ms"]["median"])
    assert "inference fp32, batch of 256 (ms)" in markdown and "inference bf16, batch of 256 (ms)" in markdown
    assert "realised, inference optimised in bf16: " in markdown and "bf16 inference: sepconv.optimize" in markdown


@pytest.mark.parametrize("capability, flags, native", [
    ("AVX512", {"avx512f", "avx512_bf16"}, True), ("AVX512", {"avx512f", "amx_bf16", "amx_tile"}, True),
    ("AVX512", {"avx512f"}, False), ("AVX2", {"avx2", "avx512_bf16"}, False), ("DEFAULT", set(), False),
])
def test_native_bf16_needs_avx512_kernels_and_a_bf16_instruction_set(capability, flags, native, monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(measure, "cpu_flags", lambda: frozenset(flags))
    assert measure.native_bf16() is native


def _tiny_twins_measured(monkeypatch, optimize, native=True, diverged=False):
    monkeypatch.setattr(measure, "native_bf16", lambda: native)
    monkeypatch.setattr(measure, "optimizer_for_inference", lambda: optimize)
    monkeypatch.setattr(measure, "ROUNDS", 1)
    monkeypatch.setattr(measure, "MIN_RUN_SECONDS", 1e-3)
    torch.manual_seed(0)
    models = {twin: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)) for twin in ("a", "b")}
    if diverged:
        with torch.no_grad():
            models["b"][1].bias.fill_(math.nan)
    inputs, labels = torch.randn(300, 4), torch.randint(0, 3, (300,))
    times = measure.measure_times(models, inputs, labels, 8, 1e-3, validation=(inputs, labels))
    return models, inputs, labels, times


@pytest.mark.parametrize("negate", [False, True])
def test_bf16_accuracy_and_agreement_come_from_the_copys_predictions(negate, monkeypatch):
    asked = []

    def optimize(model, batch, dtype=None):  # a stand-in bf16 copy: the model, or its logits negated
        asked.append(dtype)
        return torch.nn.Sequential(model, _Negate()) if negate and dtype == torch.bfloat16 else model

    models, inputs, labels, times = _tiny_twins_measured(monkeypatch, optimize)
    assert asked == [None, torch.bfloat16] * 2  # per twin: the fp32 copy, then the bf16 one
    for label, model in models.items():
        note = times[label]["bf16_inference"]
        assert times[label]["bf16_inference_ms"]["median"] > 0 and note["validation_size"] == 300
        with torch.no_grad():
            logits = model(inputs)
        fp32_accuracy = (logits.argmax(1) == labels).double().mean().item()
        assert note["fp32_validation_accuracy"] == pytest.approx(fp32_accuracy)
        if negate:  # the top class becomes the bottom one: no agreement, an error of twice the scale
            assert note["top1_agreement"] == 0 and note["max_logit_error"] == pytest.approx(2)
            assert note["validation_accuracy"] == pytest.approx((logits.argmin(1) == labels).double().mean().item())
        else:
            assert note["top1_agreement"] == 1 and note["max_logit_error"] == 0
            assert note["validation_accuracy"] == pytest.approx(fp32_accuracy)


def test_bf16_of_a_diverged_twin_is_not_measured(monkeypatch):
    *_, times = _tiny_twins_measured(monkeypatch, lambda model, batch, dtype=None: model, diverged=True)
    assert times["a"]["bf16_inference"]["top1_agreement"] == 1 and times["a"]["bf16_inference_ms"] is not None
    assert times["b"]["bf16_inference_ms"] is None
    assert times["b"]["bf16_inference"]["reason"] == "bf16: not measured (the model's own outputs are not finite)"


class _Negate(torch.nn.Module):
    def forward(self, x):
        return -x


def test_bf16_not_measured_on_a_cpu_without_it_is_said(default_run, monkeypatch):
    *_, times = _tiny_twins_measured(monkeypatch, lambda model, batch, dtype=None: model, native=False)
    for result in times.values():
        assert result["bf16_inference_ms"] is None
        assert result["bf16_inference"] == {"precision": "bf16", "method": None, "reason": measure.BF16_NOT_NATIVE}
    # the report of a run on such a CPU: the same figures otherwise
    _, _, metrics = default_run
    models = {twin: {**metrics["models"][twin], "bf16_inference_ms": None,
                     "bf16_inference": times["a"]["bf16_inference"]} for twin in ("standard", "separable")}
    rebuilt = report.build_metrics(status="complete", settings=metrics["settings"], dataset=metrics["dataset"],
                                   environment=metrics["environment"], models=models,
                                   timing_method=metrics["timing_method"], machine=metrics["machine"],
                                   resume_command=metrics["resume_command"])
    assert rebuilt["comparison"]["bf16_inference_speedup"] is None
    assert all(rebuilt["models"][twin]["bf16_vs_fp32_inference_speedup"] is None for twin in models)
    assert rebuilt["comparison"]["optimized_inference_speedup"] == metrics["comparison"]["optimized_inference_speedup"]
    markdown = report._markdown(report._blocks(rebuilt))
    assert f"## Inference in fp32 and bf16\n\n{measure.BF16_NOT_NATIVE}.\n" in markdown
    bf16_row = next(line for line in markdown.splitlines() if "inference optimised, bf16" in line)
    assert bf16_row.count("not measured") == 3
    assert report.bf16_lines(rebuilt) == [measure.BF16_NOT_NATIVE]


def test_interrupted_run_resumes_to_the_same_final_metrics(default_run, tmp_path, monkeypatch, capsys):
    _, _, uninterrupted = default_run
    out = tmp_path / "run"
    steps = []

    def train_step_then_ctrl_c(*args):
        steps.append(1)
        if len(steps) == 2 * BATCHES_PER_EPOCH + BATCHES_PER_EPOCH + 5:  # separable twin, epoch 2, batch 5
            raise KeyboardInterrupt
        return original(*args)

    original = train_module.train_step
    monkeypatch.setattr(train_module, "train_step", train_step_then_ctrl_c)
    assert cli.main([*TINY, "--out", str(out)]) == 130
    partial = json.loads((out / "metrics.json").read_text())
    assert partial["status"] == "interrupted"
    assert [len(partial["models"][twin]["epochs"]) for twin in ("standard", "separable")] == [2, 1]
    assert partial["models"]["separable"]["inference_ms"] is None  # not measured: no number is made up
    assert partial["models"]["standard"]["layer_times"] is None and partial["machine"] is None
    assert "Per-layer times: not measured." in (out / "report.md").read_text()
    assert "INTERRUPTED" in (out / "report.html").read_text() and "--resume" in (out / "report.md").read_text()
    assert torch.load(out / "checkpoints" / "separable.pt", weights_only=True)["epoch"] == 1
    assert "continue with: sepconv compare" in capsys.readouterr().out

    assert cli.main([*TINY, "--out", str(out)]) == 2  # an existing run is not overwritten without --resume
    assert "already holds a comparison; pass --resume" in capsys.readouterr().err

    resumed_steps = []
    monkeypatch.setattr(train_module, "train_step", lambda *args: resumed_steps.append(1) or original(*args))
    assert cli.main([*TINY, "--out", str(out), "--resume"]) == 0
    assert len(resumed_steps) == BATCHES_PER_EPOCH  # only the interrupted epoch runs again
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["status"] == "complete"
    for twin in ("standard", "separable"):
        assert _figures(resumed["models"][twin]["epochs"]) == _figures(uninterrupted["models"][twin]["epochs"])


def test_resume_refuses_another_runs_checkpoint(default_run, capsys):
    _, out, _ = default_run
    assert cli.main([*TINY, "--out", str(out), "--resume", "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "belongs to another run: seed=0 there, 1 here" in err


def test_digits_cnn_twins_have_the_documented_sizes_and_rank_1_stem():
    standard, separable = (create_model("digits_cnn", separable=flag) for flag in (False, True))
    assert sum(p.numel() for p in standard.parameters()) == 94_186  # the docstring's counts
    assert sum(p.numel() for p in separable.parameters()) == 13_034
    stem = separable.features.stem.conv  # spatially separable per channel: each 3x3 filter an outer product
    assert torch.linalg.matrix_rank(stem.to_dense().weight[:, 0]).tolist() == [1] * 32
    assert standard(torch.randn(2, 1, 8, 8)).shape == separable(torch.randn(2, 1, 8, 8)).shape == (2, 10)


# --- CIFAR-10 -------------------------------------------------------------------------------------

def test_cifar10_loader_reads_the_python_batches(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    raw = pickle.loads((tmp_path / "cifar-10-batches-py" / "test_batch").read_bytes())
    for directory in (tmp_path / "cifar-10-batches-py", tmp_path):  # the folder, or the folder it unpacked into
        dataset = load_dataset("cifar10", directory)
        assert dataset.input_shape == (3, 32, 32) and dataset.num_classes == 10 and dataset.class_names[0] == "airplane"
        assert len(dataset.train_labels) == 30 and dataset.validation_labels.tolist() == raw[b"labels"]
        assert dataset.train_inputs.mean(dim=(0, 2, 3)).abs().max() < 1e-5  # standardised per channel
    # the first image's red channel, standardised with the training set's statistics, in CHW order
    train = np.concatenate([pickle.loads((directory / "cifar-10-batches-py" / n).read_bytes())[b"data"]
                            for n in CIFAR_FILES[:5]]).reshape(-1, 3, 32, 32).astype(np.float64)
    red = (raw[b"data"][0, :1024].reshape(32, 32) - train[:, 0].mean()) / train[:, 0].std()
    np.testing.assert_allclose(dataset.validation_inputs[0, 0].numpy(), red, rtol=1e-5, atol=1e-5)


EXPECTED_FILES = "exactly these files: data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5, " \
                 "test_batch, batches.meta"


@pytest.mark.parametrize("damage, problem", [
    (lambda d: (d / "test_batch").unlink(), "missing test_batch"),
    (lambda d: (d / "data_batch_3").write_bytes(b"not a pickle"), "data_batch_3 is not a CIFAR-10 python pickle"),
    (lambda d: (d / "data_batch_2").write_bytes(pickle.dumps({b"data": [1, 2]}, protocol=2)),
     "data_batch_2 has no b'data' array of uint8 with 3072 values per image"),
    (lambda d: (d / "data_batch_1").write_bytes(pickle.dumps(os.system, protocol=2)),
     "data_batch_1 is not a CIFAR-10 python pickle (UnpicklingError: it refers to posix.system"),
])
def test_cifar10_missing_or_corrupt_directory_says_what_is_expected(tmp_path, damage, problem, capsys):
    directory = tmp_path / "cifar-10-batches-py"
    write_cifar(directory)
    damage(directory)
    with pytest.raises(DataError, match="CIFAR-10 needs") as error:
        load_dataset("cifar10", directory)
    assert problem in str(error.value) and EXPECTED_FILES in str(error.value)
    out = tmp_path / "run"
    assert cli.main(["compare", "--dataset", "cifar10", "--data-dir", str(directory), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and problem in err and not out.exists()


def test_cifar10_no_directory(tmp_path):
    with pytest.raises(DataError, match=f"--data-dir {tmp_path / 'nowhere'}: no such directory; CIFAR-10 needs the "
                                        f"cifar-10-batches-py folder of https://www.cs.toronto.edu/"):
        load_dataset("cifar10", tmp_path / "nowhere")


# --- EEG ------------------------------------------------------------------------------------------

def test_eeg_synthetic_shapes_determinism_and_known_structure():
    dataset = load_dataset("eeg-synthetic", seed=0)
    assert dataset.input_shape == (1, 16, 128) and dataset.num_classes == 4
    assert (len(dataset.train_labels), len(dataset.validation_labels)) == (640, 160)
    assert dataset.model_arguments() == {"num_classes": 4, "channels": 16, "samples": 128}
    assert torch.equal(load_dataset("eeg-synthetic", seed=0).train_inputs, dataset.train_inputs)
    assert not torch.equal(load_dataset("eeg-synthetic", seed=1).train_inputs, dataset.train_inputs)
    # the class signal is where the documentation says: projecting each trial on the known spatial
    # pattern and waveform of each class classifies it far above chance (0.25)
    trials, labels = make_eeg_synthetic(seed=3)
    spatial, temporal = eeg_synthetic_templates()
    scores = np.einsum("nct,kc,kt->nk", trials, spatial, temporal)
    assert (scores.argmax(1) == labels).mean() > 0.6


def test_eeg_synthetic_is_learnt_by_eegnet_and_its_twin(tmp_path, capsys):
    out = tmp_path / "eeg"
    argv = ["compare", "--dataset", "eeg-synthetic", "--epochs", "3", "--threads", "1", "--out", str(out)]
    assert cli.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["model"] == "eegnet"
    for twin in ("standard", "separable"):
        assert metrics["models"][twin]["best_validation_accuracy"] > 0.4  # four classes: chance is 0.25
    plots = {plot["file"] for plot in metrics["plots"]}
    assert "filters_separable_features_block1_spatial_conv.png" in plots  # EEGNet's depthwise spatial filters


def test_eeg_numpy_loader_and_its_errors(tmp_path):
    generator = np.random.default_rng(0)
    np.save(tmp_path / "X.npy", generator.normal(size=(20, 4, 64)))
    np.save(tmp_path / "y.npy", np.array(["left", "right"] * 10))
    dataset = load_dataset("eeg-numpy", tmp_path, seed=0)
    assert dataset.input_shape == (1, 4, 64) and dataset.class_names == ("left", "right")
    assert (len(dataset.train_labels), len(dataset.validation_labels)) == (16, 4)
    np.save(tmp_path / "y.npy", np.zeros(19))
    with pytest.raises(DataError, match=r"y.npy must hold one label per trial, shape \(20,\); got shape \(19,\)"):
        load_dataset("eeg-numpy", tmp_path)
    (tmp_path / "X.npy").unlink()
    with pytest.raises(DataError, match=f"--data-dir {tmp_path}: no X.npy; eeg-numpy needs {tmp_path}/X.npy "
                                        r"\(trials x channels x samples\)"):
        load_dataset("eeg-numpy", tmp_path)


# --- distributed ----------------------------------------------------------------------------------

def test_torchrun_two_processes_train_with_ddp_and_only_rank_0_writes(tmp_path):
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "sepconv", "compare",
                             "--epochs", "1", "--batch-size", "64", "--threads", "1", "--out", str(out)],
                            capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("sepconv compare: digits_cnn") == 1 and result.stdout.count("wrote ") == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["environment"]["processes"] == 2 and metrics["status"] == "complete"
    checkpoint = torch.load(out / "checkpoints" / "separable.pt", weights_only=True)
    assert len(checkpoint["rng"]) == 2  # each process' RNG state, gathered by rank 0
    assert not [path.name for path in out.rglob(".*.tmp")]  # no half-written file from a second writer


@pytest.mark.parametrize("backend, wait_for_all, calls", [
    ("gloo", True, ["monitored_barrier", "destroy_process_group"]),  # gives Gloo's worker threads no work
    ("nccl", True, ["barrier", "destroy_process_group"]),
    ("gloo", False, ["destroy_process_group"]),  # after a failure: the processes may be at different collectives
])
def test_distributed_close_waits_for_every_process_only_when_asked(monkeypatch, backend, wait_for_all, calls):
    made = []
    monkeypatch.setattr(train_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(train_module.dist, "get_backend", lambda: backend)
    for name in ("monitored_barrier", "barrier", "destroy_process_group"):
        monkeypatch.setattr(train_module.dist, name, lambda name=name: made.append(name))
    train_module.Distributed(rank=1, world_size=2).close(wait_for_all=wait_for_all)
    assert made == calls


def test_distributed_close_leaves_the_group_when_the_wait_fails(monkeypatch):
    made = []

    def lost_peer():
        raise RuntimeError("Rank 0 failed to pass monitoredBarrier")

    monkeypatch.setattr(train_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(train_module.dist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(train_module.dist, "monitored_barrier", lost_peer)
    monkeypatch.setattr(train_module.dist, "destroy_process_group", lambda: made.append("destroy_process_group"))
    with pytest.raises(RuntimeError, match="failed to pass monitoredBarrier"):
        train_module.Distributed(rank=1, world_size=2).close(wait_for_all=True)
    assert made == ["destroy_process_group"]


# --- user errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["compare", "--epochs", "0"],
     "sepconv compare: error: argument --epochs: must be an int from 1 to 100000; got '0'"),
    (["compare", "--batch-size", "many"], "argument --batch-size: must be an int from 1 to 1048576; got 'many'"),
    (["compare", "--lr", "-0.1"], "argument --lr: must be a number in (0, 1e+36]; got '-0.1'"),
    (["compare", "--dataset", "mnist"], "argument --dataset: must be one of digits, cifar10, eeg-synthetic, eeg-numpy, "
                                        "eeg-mne, video-synthetic, moabb:NAME; got 'mnist'"),
    (["compare", "--dataset", "moabb:"], "argument --dataset: must be one of digits, cifar10, eeg-synthetic, "
                                         "eeg-numpy, eeg-mne, video-synthetic, moabb:NAME; got 'moabb:'"),
    (["compare", "--resample", "1e300"], "argument --resample: must be a number in (0, 100000]; got '1e300'"),
    (["compare", "--fmin", "nan"], "argument --fmin: must be a number in (0, 100000]; got 'nan'"),
])
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err


@pytest.mark.parametrize("argv, message", [
    (["--resume"], "--resume needs --out DIR, the folder of the run to continue"),
    (["--model", "resnet"],
     "--model 'resnet' is not a registered model; choose one of convnext_k7, digits_cnn, eegnet,"),
    (["--model", "eegnet"], "--model eegnet does not fit --dataset digits (inputs 1x8x8, 10 classes): TypeError: "
                            "EEGNet.__init__() got an unexpected keyword argument 'in_channels'"),
    (["--model", "vgg_cifar", "--dataset", "eeg-synthetic"], "--model vgg_cifar does not fit --dataset eeg-synthetic "
                                                             "(inputs 1x16x128, 4 classes): TypeError:"),
    (["--dataset", "eeg-numpy"], "--dataset eeg-numpy needs --data-dir PATH"),
    (["--data-dir", "data"], "--dataset digits reads no --data-dir (got 'data'); only cifar10, eeg-numpy, eeg-mne do"),
])
def test_bad_requests_exit_2_with_one_line_and_write_nothing(argv, message, tmp_path, capsys):
    out = tmp_path / "run"
    argv = argv if "--resume" in argv else [*argv, "--out", str(out)]
    assert cli.main(["compare", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"sepconv compare: error: {message}" in err
    assert not out.exists()
