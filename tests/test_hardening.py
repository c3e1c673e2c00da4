"""Issue 18: nothing a user owns is overwritten, failures are one line before work starts, hostile files stay cheap.

CLI cases go through ``sepconv.cli.main`` (or ``python -m sepconv`` where the process itself could die).
"""

import contextlib
import io
import json
import math
import pickle
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sepconv.models.digits_cnn  # noqa: F401  (registers "digits_cnn")
from sepconv import cli, load_converted
from sepconv._io import CheckpointError, load_checkpoint, save_checkpoint
from sepconv.experiment import DataError, load_dataset
from sepconv.experiment import train as train_module
from sepconv.experiment.plots import plot_learned_filters, plot_training_curves
from sepconv.models import create_model
from helpers import run_cli, write_cifar

TINY = ["--batch-size", "64", "--threads", "1"]  # digits: 23 batches per epoch
BATCHES_PER_EPOCH = 23


def assert_one_line_error(err: str, message: str) -> None:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err


def flip_byte_inside(path: Path, tensor: torch.Tensor) -> None:
    """Flip one bit of ``tensor``'s data where the file stores it."""
    data = bytearray(path.read_bytes())
    at = data.find(tensor.detach().contiguous().numpy().tobytes()[:64])
    assert at >= 0
    data[at + 5] ^= 0x10
    path.write_bytes(bytes(data))


# --- 1. decompose never replaces IN.pt, and replaces OUT.pt / REPORT.md only with --force ----------------

@pytest.fixture
def state_dict(tmp_path) -> Path:
    path = tmp_path / "in.pt"
    torch.save(create_model("digits_cnn").state_dict(), path)
    return path


@pytest.mark.parametrize("paths, message", [
    (["-o", "{in}"], "IN.pt {in} and -o {in} are the same file"),
    (["-o", "{dir}/out.pt", "--report", "{in}"], "IN.pt {in} and --report {in} are the same file"),
    (["-o", "{dir}/x.pt", "--report", "{dir}/x.pt"], "-o {dir}/x.pt and --report {dir}/x.pt are the same file"),
    (["-o", "{dir}/link.pt"], "IN.pt {in} and -o {dir}/link.pt are the same file"),  # a symlink to IN.pt
    (["-o", "{dir}/sub/../in.pt"], "are the same file"),
])
def test_decompose_refuses_one_file_for_two_roles(state_dict, paths, message, capsys):
    directory = state_dict.parent
    (directory / "link.pt").symlink_to(state_dict)
    (directory / "sub").mkdir()
    before = state_dict.read_bytes()

    def fill(text):
        return text.replace("{in}", str(state_dict)).replace("{dir}", str(directory))
    code, _, err = run_cli(["decompose", str(state_dict), *map(fill, paths), "--model", "digits_cnn"], capsys)
    assert code == 2
    assert_one_line_error(err, fill(message))
    assert state_dict.read_bytes() == before
    assert sorted(p.name for p in directory.iterdir()) == ["in.pt", "link.pt", "sub"]


def test_decompose_replaces_an_existing_output_only_with_force(state_dict, capsys):
    out, report = state_dict.parent / "out.pt", state_dict.parent / "report.md"
    out.write_text("the user's file")
    argv = ["decompose", str(state_dict), "-o", str(out), "--model", "digits_cnn", "--energy", "0.9"]
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    assert_one_line_error(err, f"-o {out} exists; pass --force to replace it")
    assert out.read_text() == "the user's file"
    report.write_text("notes")
    code, _, err = run_cli([*argv, "--force", "--report", str(report)], capsys)
    assert code == 0, err
    assert report.read_text().startswith("# Decomposition of")
    assert isinstance(load_converted(out, create_model("digits_cnn")), torch.nn.Module)


# --- 2. compare writes only into a new or empty --out, a run it resumes, or with --force ---------------

def test_compare_refuses_a_folder_of_the_users_files(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_module, "train_step", lambda *args: pytest.fail("trained"))
    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.md").write_text("my report")
    (out / "plot.png").write_bytes(b"my plot")
    for extra, message in (([], f"--out {out} is not empty (plot.png, report.md); choose a new or empty folder, or "
                                "pass --force"),
                           (["--resume"], f"--out {out} holds no comparison to --resume")):
        code, _, err = run_cli(["compare", "--out", str(out), *extra], capsys)
        assert code == 2
        assert_one_line_error(err, message)
    assert sorted(p.name for p in out.iterdir()) == ["plot.png", "report.md"]
    assert (out / "report.md").read_text() == "my report"


def test_compare_refuses_an_empty_out(capsys):
    code, _, err = run_cli(["compare", "--out", ""], capsys)
    assert code == 2
    assert_one_line_error(err, "argument --out: must name a folder; got ''")


@pytest.fixture(scope="module")
def forced_run(tmp_path_factory):
    """One epoch per twin, written with --force into a folder that holds a file of the user's."""
    out = tmp_path_factory.mktemp("forced") / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code = cli.main(["compare", *TINY, "--epochs", "1", "--out", str(out), "--force"])
    return code, out


def test_compare_with_force_leaves_the_users_other_files(forced_run):
    code, out = forced_run
    assert code == 0
    assert (out / "notes.txt").read_text() == "keep me"
    assert json.loads((out / "metrics.json").read_text())["status"] == "complete"


# --- 3. a diverged training is reported, not a crash ----------------------------------------------------

def test_diverged_training_stops_that_twin_and_still_writes_the_report(tmp_path, monkeypatch, capsys):
    original = train_module.train_step
    steps = []
    poisoned = {5, 2 * BATCHES_PER_EPOCH + 3}  # standard twin: epoch 1, separable twin: epoch 2 (standard stops)

    def train_step_going_to_nan(network, optimizer, inputs, labels):
        steps.append(1)
        result = original(network, optimizer, inputs, labels)
        if len(steps) in poisoned:
            with torch.no_grad():
                for parameter in network.parameters():
                    parameter.fill_(math.nan)
        return result

    monkeypatch.setattr(train_module, "train_step", train_step_going_to_nan)
    out = tmp_path / "run"
    code, stdout, err = run_cli(["compare", *TINY, "--epochs", "2", "--out", str(out)], capsys)
    assert code == 0, err
    assert len(steps) == BATCHES_PER_EPOCH + 2 * BATCHES_PER_EPOCH  # each twin stopped at the epoch it diverged
    assert "standard twin: DIVERGED at epoch 1" in stdout and "separable twin: DIVERGED at epoch 2" in stdout

    def no_bare_nan(constant):
        raise AssertionError(f"metrics.json holds a bare {constant}, which is not JSON")
    metrics = json.loads((out / "metrics.json").read_text(), parse_constant=no_bare_nan)
    standard, separable = metrics["models"]["standard"], metrics["models"]["separable"]
    assert standard["diverged_at_epoch"] == 1 and separable["diverged_at_epoch"] == 2
    assert standard["epochs"][0]["train_loss"] == "nan"
    assert math.isfinite(separable["epochs"][0]["train_loss"])
    assert not (out / "checkpoints" / "standard.pt").exists()  # no finite epoch to keep
    assert load_checkpoint(out / "checkpoints" / "separable.pt")["epoch"] == 1  # the last finite one
    report = (out / "report.md").read_text()
    assert "DIVERGED: the standard twin's loss was not finite (nan or inf) at epoch 1" in report
    assert "DIVERGED: the separable twin's loss was not finite (nan or inf) at epoch 2" in report
    for plot in metrics["plots"]:  # the filters of both diverged twins are drawn too
        assert (out / plot["file"]).read_bytes().startswith(b"\x89PNG")
    assert any(plot["file"].startswith("filters_separable") for plot in metrics["plots"])


def test_plots_survive_non_finite_weights_and_metrics(tmp_path):
    model = create_model("digits_cnn", separable=True)
    with torch.no_grad():
        for index, parameter in enumerate(model.parameters()):
            parameter.view(-1)[0] = (math.nan, math.inf, -math.inf)[index % 3]
    plots = plot_learned_filters(model, tmp_path, prefix="separable")
    assert plots and all((tmp_path / plot["file"]).exists() for plot in plots)
    history = [{"epoch": 1, "train_loss": math.inf, "validation_loss": math.nan, "train_accuracy": 0.1,
                "validation_accuracy": 0.1}]
    plot_training_curves({"standard": history, "separable": history}, "diverged", tmp_path / "curves.png")
    assert (tmp_path / "curves.png").exists()


# --- 4. a CIFAR-10 pickle cannot make the loader allocate more than a batch -----------------------------

class _ArrayBomb:
    """Pickles as a call of the numpy.ndarray constructor: 300 bytes that ask for gigabytes."""

    def __init__(self, shape):
        self.shape = shape

    def __reduce__(self):
        return np.ndarray, (self.shape, np.dtype("uint8"))


class _StateBomb:
    """Pickles as numpy's own array reconstruction, then a state claiming a huge array of Python objects."""

    def __reduce__(self):
        reconstruct = np.zeros(1).__reduce__()[0]
        return reconstruct, (np.ndarray, (0,), b"b"), (1, (10**9,), np.dtype(object), False, [1, 2])


def test_cifar_pickle_asking_for_a_huge_array_is_refused_before_allocating(tmp_path):
    directory = tmp_path / "cifar-10-batches-py"
    write_cifar(directory, images_per_batch=3)
    bomb = pickle.dumps({b"data": _ArrayBomb((150_000, 3072)), b"labels": [0] * 3}, protocol=2)
    assert len(bomb) < 400
    (directory / "data_batch_1").write_bytes(bomb)
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"data_batch_1 is not a CIFAR-10 python pickle \(UnpicklingError: it "
                                            r"asks for an array of shape \(150000, 3072\) and dtype uint8 "
                                            r"\(460,800,000 bytes\), more than a batch's 10,000 x 3,072 uint8 images"):
            load_dataset("cifar10", directory)
        assert tracemalloc.get_traced_memory()[1] < 32 * 2**20
    finally:
        tracemalloc.stop()


def test_cifar_pickle_with_a_hostile_array_state_is_refused(tmp_path):
    """numpy's __setstate__ trusts its state (this one crashed the process); run apart, in case it still does."""
    directory = tmp_path / "cifar-10-batches-py"
    write_cifar(directory, images_per_batch=3)
    (directory / "data_batch_2").write_bytes(pickle.dumps({b"data": _StateBomb(), b"labels": []}, protocol=2))
    result = subprocess.run([sys.executable, "-m", "sepconv", "compare", "--dataset", "cifar10", "--data-dir",
                             str(directory), "--out", str(tmp_path / "run")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert_one_line_error(result.stderr, "data_batch_2 is not a CIFAR-10 python pickle (UnpicklingError: it asks "
                                         "for an array of shape (1000000000,) and dtype object")


# --- 5. eeg-numpy reads each header before the array -----------------------------------------------------

def _write_eeg(directory: Path, trials=None, labels=None) -> None:
    directory.mkdir(exist_ok=True)
    np.save(directory / "X.npy", np.random.default_rng(0).normal(size=(8, 2, 16)) if trials is None else trials)
    np.save(directory / "y.npy", np.array([0, 1] * 4) if labels is None else labels)


def test_eeg_header_claiming_a_huge_array_is_refused_before_allocating(tmp_path):
    _write_eeg(tmp_path)
    with open(tmp_path / "X.npy", "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "<f8", "fortran_order": False,
                                                      "shape": (10**7, 64, 20_000)})
        handle.write(bytes(16))
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"X.npy claims shape \(10000000, 64, 20000\) of float64 "
                                            r"\(102,400,000,000,000 bytes\), but holds 16 bytes of data"):
            load_dataset("eeg-numpy", tmp_path)
        assert tracemalloc.get_traced_memory()[1] < 8 * 2**20
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("trials, labels, message", [
    (np.ones((8, 2, 16), np.complex64), None, "X.npy holds complex64 values; it must hold real numbers"),
    (np.ones((8, 2, 16), bool), None, "X.npy holds bool values; it must hold real numbers"),
    (None, np.array([0.0, 1.0, np.nan, 1.0] * 2), "y.npy holds 2 labels that are nan or inf"),
    (None, np.array([{}] * 8, dtype=object), "y.npy holds object values; it must hold real numbers or labels"),
])
def test_eeg_complex_inputs_and_nan_labels_are_refused(tmp_path, trials, labels, message):
    _write_eeg(tmp_path, trials, labels)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_dataset("eeg-numpy", tmp_path)


def test_eeg_missing_data_dir_says_so(tmp_path):
    with pytest.raises(DataError, match=f"--data-dir {tmp_path / 'nowhere'}: no such directory; eeg-numpy needs"):
        load_dataset("eeg-numpy", tmp_path / "nowhere")


# --- 6. compare: an unwritable --out fails before training; a full disk is one line ----------------------

def test_compare_out_under_a_file_fails_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_module, "train_step", lambda *args: pytest.fail("trained"))
    (tmp_path / "file").write_text("")
    code, _, err = run_cli(["compare", "--out", str(tmp_path / "file" / "run")], capsys)
    assert code == 2
    assert_one_line_error(err, f"--out {tmp_path / 'file' / 'run'}: {tmp_path / 'file'} is a file, so no folder can "
                               "be made there")


def test_compare_full_disk_is_one_line_and_keeps_the_earlier_checkpoint(tmp_path, capsys, monkeypatch):
    saves = []
    original_save = torch.save

    def save_until_the_disk_is_full(obj, path):
        saves.append(path)
        if len(saves) > 1:
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\n"
                               "PytorchStreamWriter failed writing file data/0: file write failed")
        original_save(obj, path)

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)  # what sepconv's checkpoint writer calls
    out = tmp_path / "run"
    code, _, err = run_cli(["compare", *TINY, "--epochs", "2", "--out", str(out)], capsys)
    assert code == 1
    checkpoint = out / "checkpoints" / "standard.pt"
    assert_one_line_error(err, f"sepconv compare: error: cannot write {checkpoint}: [enforce fail at "
                               "inline_container.cc:664] . unexpected pos 64 vs 0")
    monkeypatch.undo()
    assert load_checkpoint(checkpoint)["epoch"] == 1
    assert not list(out.rglob("*.tmp"))


# --- 7. decompose: every bad file or path is one line -----------------------------------------------------

@pytest.mark.parametrize("make, argv, message", [
    (lambda d: (d / "in.pt").write_bytes(b""), ["{d}/in.pt", "-o", "{d}/o.pt"], "{d}/in.pt is empty"),
    (lambda d: (d / "in.pt").mkdir(), ["{d}/in.pt", "-o", "{d}/o.pt"],
     "{d}/in.pt is a directory; IN.pt must be a file"),
    (lambda d: (d / "in.pt").write_bytes(np.random.default_rng(0).bytes(1000)), ["{d}/in.pt", "-o", "{d}/o.pt"],
     "{d}/in.pt is not a PyTorch checkpoint (a file written by torch.save)"),
    (lambda d: np.save(d / "in.npy", np.zeros(3)), ["{d}/in.npy", "-o", "{d}/o.pt"],
     "{d}/in.npy is not a PyTorch checkpoint (a file written by torch.save)"),
    (None, ["{sd}", "-o", "{d}"], "-o {d} is a directory; it must name a file"),
    (None, ["{sd}", "-o", ""], "-o must name a file; got ''"),
    (None, ["{sd}", "-o", "{sd}/o.pt"], "-o {sd}/o.pt: {sd} is a file, so no folder can be made there"),
    (None, ["{sd}", "-o", "{d}/o.pt", "--model", ":"],
     "MODEL ':': package.module:factory needs both a module and a factory name"),
    (None, ["{sd}", "-o", "{d}/o.pt", "--trust-pickle", "--model", "digits_cnn"],
     "--model names the architecture of a state dict; --trust-pickle loads a whole pickled model"),
])
def test_decompose_bad_files_and_paths_are_one_line(state_dict, make, argv, message, capsys):
    directory = state_dict.parent / "work"
    directory.mkdir()
    if make is not None:
        make(directory)

    def fill(text):
        return text.replace("{d}", str(directory)).replace("{sd}", str(state_dict))
    code, _, err = run_cli(["decompose", *map(fill, argv), *([] if "--model" in argv else ["--model", "digits_cnn"])],
                           capsys)
    assert code == 2
    assert_one_line_error(err, fill(message))
    assert "--trust-pickle" not in err or "--model names" in err  # the unsafe flag only for real pickled models
    assert not (directory / "o.pt").exists()


def test_decompose_full_disk_is_one_line(state_dict, capsys, monkeypatch):
    def full(obj, path):
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    monkeypatch.setattr(torch, "save", full)
    out = state_dict.parent / "out.pt"
    code, _, err = run_cli(["decompose", str(state_dict), "-o", str(out), "--model", "digits_cnn"], capsys)
    assert code == 1
    assert_one_line_error(err, f"cannot write {out}: PytorchStreamWriter failed writing file data/0")
    assert sorted(p.name for p in state_dict.parent.iterdir()) == ["in.pt"]


# --- 8. extreme values are refused up front ----------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["compare", "--lr", "1e308"], "argument --lr: must be a number in (0, 1e+36]; got '1e308'"),
    (["compare", "--lr", "4e37"], "argument --lr: must be a number in (0, 1e+36]; got '4e37'"),  # overflowed Adam
    (["compare", "--seed", "99999999999999999999"], "argument --seed: must be an int from 0 to 4294967295"),
    (["example", "--input", "100000x512x512x512", "--no-measure"],
     "sepconv example: error: --input 100000x512x512x512 with --out-channels 64 needs at least"),
    (["profile", "mobilenet_v1", "--input", "100000x3x2240x2240"],
     "sepconv profile: error: --input 100000x3x2240x2240 needs at least 5,607.6 GiB of memory"),
    (["decompose", "{sd}", "-o", "{d}/o.pt", "--model", "digits_cnn", "--input", "100000x1x8000x8000"],
     "sepconv decompose: error: --input 100000x1x8000x8000 needs at least"),
])
def test_extreme_values_are_one_line_errors(argv, message, state_dict, capsys):
    argv = [a.replace("{sd}", str(state_dict)).replace("{d}", str(state_dict.parent)) for a in argv]
    tracemalloc.start()
    try:
        code, _, err = run_cli(argv, capsys)
        assert tracemalloc.get_traced_memory()[1] < 256 * 2**20
    finally:
        tracemalloc.stop()
    assert code == 2
    assert_one_line_error(err, message)


NUMERIC_FLAGS = {  # command prefix -> its numeric flags
    ("compare",): ["--epochs", "--batch-size", "--lr", "--seed", "--threads"],
    ("example",): ["--input", "--out-channels", "--kernel-size", "--stride", "--padding", "--depth-multiplier"],
    ("decompose", "in.pt", "-o", "out.pt"): ["--energy", "--rank", "--max-error", "--budget-params", "--budget-macs",
                                             "--input"],
    ("profile", "digits_cnn"): ["--input", "--repeats", "--warmup"],
}
NUMBERS = st.one_of(st.integers(-2**70, 2**70).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
                    st.tuples(st.integers(-5, 2**40), st.integers(-5, 2**40)).map(lambda t: f"{t[0]}x{t[1]}x8x8"),
                    st.sampled_from(["", " ", "1e309", "-0", "0x10", "1_000", "nan", "1e-320", "４", "1.5"]),
                    st.text(max_size=12))


@given(command=st.sampled_from(sorted(NUMERIC_FLAGS)), index=st.integers(0, 5), value=NUMBERS)
def test_numeric_flags_parse_or_fail_in_one_line(command, index, value):
    flags = NUMERIC_FLAGS[command]
    argv = [*command, f"{flags[index % len(flags)]}={value}"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            cli.build_parser().parse_args(argv)
            code = 0
        except SystemExit as exit_info:
            code = exit_info.code
    assert code == 0 or (code == 2 and err.getvalue().count("\n") == 1 and "Traceback" not in err.getvalue()), \
        (argv, code, err.getvalue())


# --- 10. messages that name the real problem ----------------------------------------------------------------

def test_unknown_command_is_named(capsys):
    code, _, err = run_cli(["frobnicate"], capsys)
    assert code == 2
    assert_one_line_error(err, "sepconv: error: unknown command 'frobnicate'; choose one of compare, example, "
                               "decompose, profile")


def test_checkpoint_errors_do_not_advise_weights_only_false(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "model.pt")
    with pytest.raises(CheckpointError) as error:
        load_converted(tmp_path / "model.pt", torch.nn.Linear(2, 2))
    assert str(error.value) == f"{tmp_path / 'model.pt'} holds pickled Python objects besides tensors, which run " \
                               "code when loaded"


# --- 11. checkpoints carry a digest -------------------------------------------------------------------------

def test_a_flipped_byte_in_a_checkpoint_is_detected(tmp_path):
    weights = torch.arange(1000, dtype=torch.float32)
    save_checkpoint({"weights": weights, "epoch": 3}, tmp_path / "c.pt")
    assert torch.equal(load_checkpoint(tmp_path / "c.pt")["weights"], weights)
    flip_byte_inside(tmp_path / "c.pt", weights)
    with pytest.raises(CheckpointError, match="c.pt is damaged: its content does not match the digest it was saved"):
        load_checkpoint(tmp_path / "c.pt")


def test_load_converted_refuses_a_damaged_file(state_dict, capsys):
    out = state_dict.parent / "out.pt"
    assert cli.main(["decompose", str(state_dict), "-o", str(out), "--model", "digits_cnn", "--energy", "0.9"]) == 0
    bundle = load_checkpoint(out)
    flip_byte_inside(out, next(iter(bundle["state_dict"].values())))
    with pytest.raises(CheckpointError, match="is damaged"):
        load_converted(out, create_model("digits_cnn"))


def test_resume_refuses_a_damaged_checkpoint(forced_run, tmp_path, capsys):
    import shutil
    _, out = forced_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    checkpoint = copy / "checkpoints" / "separable.pt"
    flip_byte_inside(checkpoint, next(iter(load_checkpoint(checkpoint)["model"].values())))
    code, _, err = run_cli(["compare", *TINY, "--epochs", "1", "--out", str(copy), "--resume"], capsys)
    assert code == 2
    assert_one_line_error(err, f"{checkpoint} is damaged: its content does not match the digest it was saved with")


def test_compare_refuses_a_batch_larger_than_memory(tmp_path, capsys, monkeypatch):
    import sepconv.experiment.compare as compare_module
    monkeypatch.setattr(compare_module, "machine_memory_bytes", lambda: 2**27)
    out = tmp_path / "run"
    code, _, err = run_cli(["compare", "--batch-size", "1048576", "--out", str(out)], capsys)
    assert code == 2
    assert_one_line_error(err, "--batch-size 1048576 of 1x8x8 inputs needs at least 0.2 GiB")
    assert not out.exists()
