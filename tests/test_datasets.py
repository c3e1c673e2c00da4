"""Data by name: CIFAR-10 downloaded from a local HTTP server exactly as from the real host (only the URL and
checksum overridden), the cache, and every way a download can fail; real EEG through MNE (epochs files the
tests write) and MOABB (its generated FakeDataset)."""

import hashlib
import html
import http.server
import io
import json
import socket
import tarfile
import threading
import types
from pathlib import Path

import numpy as np
import pytest

from sepconv import cli
from sepconv.experiment import DataError, download, load_dataset
from sepconv.experiment.data import CIFAR_FILES, CIFAR_FOLDER, stratified_split
from helpers import write_cifar

ARCHIVE = "cifar-10-python.tar.gz"


def _tarball(tmp_path, extra=None) -> bytes:
    """A gzipped tarball in the real CIFAR-10 layout (``cifar-10-batches-py/...``), a few images per batch;
    ``extra(tar)`` may add members."""
    write_cifar(tmp_path / "source" / CIFAR_FOLDER)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(tmp_path / "source" / CIFAR_FOLDER, arcname=CIFAR_FOLDER)
        if extra is not None:
            extra(tar)
    return buffer.getvalue()


@pytest.fixture
def server():
    """An HTTP server on 127.0.0.1 serving ``state.body`` at any path; the first ``state.truncated`` responses
    announce the whole body but send half of it. Counts the requests."""
    state = types.SimpleNamespace(body=b"", truncated=0, requests=0)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            state.requests += 1
            self.send_response(200)
            self.send_header("Content-Length", str(len(state.body)))
            self.end_headers()
            truncate = state.requests <= state.truncated
            self.wfile.write(state.body[:len(state.body) // 2] if truncate else state.body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_port}/{ARCHIVE}"
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("SEPCONV_DATA", str(folder))
    monkeypatch.setattr(download, "RETRIES", 0)  # one attempt: no waits between retries
    return folder


def _serve(server, monkeypatch, body: bytes, md5: str | None = None) -> None:
    server.body = body
    monkeypatch.setenv("SEPCONV_CIFAR10_URL", server.url)
    monkeypatch.setenv("SEPCONV_CIFAR10_MD5", md5 or hashlib.md5(body).hexdigest())


def _files(folder):
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*")) if folder.exists() else []


def test_cifar10_by_name_downloads_once_then_runs_from_the_cache(tmp_path, server, cache, monkeypatch, capsys):
    _serve(server, monkeypatch, _tarball(tmp_path))
    out = tmp_path / "run"
    argv = ["compare", "--dataset", "cifar10", "--epochs", "1", "--batch-size", "16", "--threads", "1"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    assert server.requests == 1 and f"downloading {server.url} into {cache}" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["model"] == "vgg_cifar" and metrics["settings"]["data_dir"] is None
    assert f"CIFAR-10 from {server.url} (MD5 verified), cached in {cache / CIFAR_FOLDER}" in \
        metrics["dataset"]["description"]
    assert _files(cache) == sorted([ARCHIVE, CIFAR_FOLDER, *(f"{CIFAR_FOLDER}/{name}" for name in CIFAR_FILES)])
    server.body = b""  # a cache hit needs no network: the server would now serve nothing
    assert len(load_dataset("cifar10").train_labels) == 30 and server.requests == 1
    assert "downloading" not in capsys.readouterr().out


def test_a_failed_attempt_is_retried(tmp_path, server, cache, monkeypatch):
    monkeypatch.setattr(download, "RETRIES", 1)
    _serve(server, monkeypatch, _tarball(tmp_path))
    server.truncated = 1
    assert load_dataset("cifar10").num_classes == 10 and server.requests == 2


def _link(tar):
    member = tarfile.TarInfo(f"{CIFAR_FOLDER}/shortcut")
    member.type, member.linkname = tarfile.SYMTYPE, "/etc/passwd"
    tar.addfile(member)


def _escape(tar):
    member = tarfile.TarInfo("../escaped")
    member.size = 2
    tar.addfile(member, io.BytesIO(b"hi"))


@pytest.mark.parametrize("case, message", [
    ("wrong checksum", "downloading {url} to {cache}/cifar-10-python.tar.gz failed (ValueError: MD5 hash of "
                       "downloaded file (cifar-10-python.tar.gz) does not match the known hash: expected "
                       "md5:00000000000000000000000000000000"),
    ("truncated body", "downloading {url} to {cache}/cifar-10-python.tar.gz failed (ChunkedEncodingError:"),
    ("absent server", "downloading {url} to {cache}/cifar-10-python.tar.gz failed (ConnectionError:"),
    ("../ member", "{cache}/cifar-10-python.tar.gz: member '../escaped' is outside the folder; the archive is "
                   "refused, nothing was unpacked"),
    ("link member", "{cache}/cifar-10-python.tar.gz: member 'cifar-10-batches-py/shortcut' is a link or special "
                    "file; the archive is refused"),
])
def test_a_failed_download_is_one_line_leaves_nothing_half_written_and_the_next_run_retries(
        tmp_path, server, cache, monkeypatch, capsys, case, message):
    good = _tarball(tmp_path / "good")
    body = _tarball(tmp_path, {"../ member": _escape, "link member": _link}.get(case))
    _serve(server, monkeypatch, body, "0" * 32 if case == "wrong checksum" else None)
    server.truncated = 1 if case == "truncated body" else 0
    if case == "absent server":
        with socket.socket() as unused:  # a port nothing listens on
            unused.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{unused.getsockname()[1]}/{ARCHIVE}"
        monkeypatch.setenv("SEPCONV_CIFAR10_URL", url)
    else:
        url = server.url
    out = tmp_path / "run"
    assert cli.main(["compare", "--dataset", "cifar10", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert message.format(url=url, cache=cache) in err
    assert not out.exists() and not (tmp_path / "escaped").exists()
    kept = [ARCHIVE] if "member" in case else []  # a verified archive stays; it is refused again, not re-fetched
    assert _files(cache) == kept

    (cache / ARCHIVE).unlink(missing_ok=True)
    _serve(server, monkeypatch, good)  # the next run, with the server fixed: downloads again and works
    server.truncated = 0
    assert load_dataset("cifar10").num_classes == 10



def test_a_full_disk_while_unpacking_leaves_no_partial_folder(tmp_path, server, cache, monkeypatch, capsys):
    _serve(server, monkeypatch, _tarball(tmp_path))
    extract = tarfile.TarFile.extractall

    def full_disk(self, path, *args, **kwargs):
        (Path(path) / "partial").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tarfile.TarFile, "extractall", full_disk)
    assert cli.main(["compare", "--dataset", "cifar10", "--out", str(tmp_path / "run")]) == 2
    assert (f"cannot unpack {cache / ARCHIVE} (OSError: [Errno 28] No space left on device); nothing was unpacked, "
            "the next run tries again\n") in capsys.readouterr().err
    assert _files(cache) == [ARCHIVE]
    monkeypatch.setattr(tarfile.TarFile, "extractall", extract)
    assert load_dataset("cifar10").num_classes == 10 and server.requests == 1  # the verified archive is reused

# --- real EEG through MNE and MOABB ---------------------------------------------------------------

def _write_epochs(folder, subject: str, trials: int = 20, sampling_rate: float = 128.0, seed: int = 0):
    """An MNE epochs file: 3 EEG channels and an EOG channel (not data: left out), events 'left' and 'right'."""
    import mne

    generator = np.random.default_rng(seed)
    info = mne.create_info(["C3", "Cz", "C4", "EOG"], sampling_rate, ["eeg", "eeg", "eeg", "eog"])
    info["subject_info"] = {"his_id": subject}
    codes = np.tile([1, 2], trials // 2)
    events = np.column_stack([np.arange(trials) * 200, np.zeros(trials, int), codes])
    data = generator.normal(size=(trials, 4, 64)) * 1e-5
    data[:, 0] += (codes == 1)[:, None] * 2e-5  # left: C3 raised, so the label is learnable
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{subject}-epo.fif"
    mne.EpochsArray(data, info, events, event_id={"left": 1, "right": 2}, verbose="error").save(path, verbose="error")
    return path, data, codes


def test_eeg_mne_reads_epochs_files_with_their_event_labels_and_reports_them(tmp_path, capsys):
    folder = tmp_path / "epochs"
    _, first, codes = _write_epochs(folder, "sub-01")
    _write_epochs(folder, "sub-02", seed=1)
    out = tmp_path / "run"
    assert cli.main(["compare", "--dataset", "eeg-mne", "--data-dir", str(folder), "--epochs", "2", "--threads", "1",
                     "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["model"] == "eegnet"
    dataset = metrics["dataset"]
    assert dataset["input_shape"] == [1, 3, 64] and dataset["class_names"] == ["left", "right"]
    assert dataset["details"] == {"source": f"MNE epochs files in {folder}: sub-01-epo.fif, sub-02-epo.fif",
                                  "subjects": ["sub-01", "sub-02"],
                                  "sessions": "not recorded (one recording per file)", "channels": ["C3", "Cz", "C4"],
                                  "sampling rate (Hz)": 128.0, "validation": "stratified 20% chosen by the seed"}
    assert dataset["per_class"] == {"train": {"left": 16, "right": 16}, "validation": {"left": 4, "right": 4}}
    markdown = (out / "report.md").read_text()
    for line in ("- subjects: 2 (sub-01, sub-02)", "- channels: 3 (C3, Cz, C4)", "- sampling rate (Hz): 128",
                 "- trials per class, training / validation: left 16 / 4, right 16 / 4"):
        assert line in markdown and html.escape(line[2:]) in (out / "report.html").read_text()
    # the first training trial: its label from event_id, its EEG channels (not EOG) standardised per channel
    loaded = load_dataset("eeg-mne", folder, seed=0)
    trial = stratified_split(np.r_[codes, codes] - 1, 0)[0][0]  # the files in name order, both with these labels
    assert trial < len(codes) and loaded.train_labels[0] == codes[trial] - 1
    for channel in range(3):
        assert np.corrcoef(loaded.train_inputs[0, 0, channel].numpy(), first[trial, channel])[0, 1] > 0.9999


def test_eeg_mne_errors_name_the_file(tmp_path):
    folder = tmp_path / "epochs"
    with pytest.raises(DataError, match=f"--data-dir {folder}: no such directory"):
        load_dataset("eeg-mne", folder)
    folder.mkdir()
    with pytest.raises(DataError, match=r"no MNE epochs files \(\*-epo.fif, "):
        load_dataset("eeg-mne", folder)
    _write_epochs(folder, "sub-01")
    _write_epochs(folder, "sub-02", sampling_rate=256.0)
    with pytest.raises(DataError, match="sub-02-epo.fif has sampling rate 256.0, sub-01-epo.fif has 128.0; eeg-mne "
                                        "needs the same channels, sampling rate and epoch length in every file"):
        load_dataset("eeg-mne", folder)
    (folder / "sub-02-epo.fif").write_bytes(b"not a fif file")
    with pytest.raises(DataError, match="sub-02-epo.fif is not a readable MNE epochs file"):
        load_dataset("eeg-mne", folder)


@pytest.fixture
def mne_data(tmp_path, monkeypatch):
    monkeypatch.setenv("MNE_DATA", str(tmp_path / "mne_data"))  # should MOABB write anything, it goes here


def test_moabb_fake_dataset_trains_eegnet_and_its_twin_validated_by_session(tmp_path, mne_data, capsys):
    out = tmp_path / "run"
    assert cli.main(["compare", "--dataset", "moabb:FakeDataset", "--subjects", "1", "--fmax", "30", "--epochs", "1",
                     "--threads", "1", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["model"] == "eegnet"
    assert metrics["settings"]["eeg_options"] == {"subjects": [1], "paradigm": None, "fmin": None, "fmax": 30.0,
                                                  "resample": None}
    assert "--dataset moabb:FakeDataset --subjects 1 --fmax 30 --epochs 1" in metrics["resume_command"]
    dataset = metrics["dataset"]
    details = dataset["details"]
    assert details["source"].startswith("MOABB FakeDataset (code FakeDataset-") and \
        details["source"].endswith("through the motor-imagery paradigm (band-pass 8-30 Hz)")
    assert details["subjects"] == [1] and details["sessions"] == ["0", "1"]
    assert details["channels"] == ["C3", "Cz", "C4"] and details["sampling rate (Hz)"] == 128.0
    assert details["validation"] == "by session: trained on 0, validated on 1"
    assert dataset["class_names"] == ["fake1", "fake2", "fake3"]
    assert dataset["train_size"] == dataset["validation_size"] == 120  # 60 events x 2 runs per session
    assert "- validation: by session: trained on 0, validated on 1" in (out / "report.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "moabb:NoSuchSet"],
     "--dataset moabb:NoSuchSet: moabb.datasets has no data set 'NoSuchSet' (e.g. BNCI2014_001, FakeDataset)"),
    (["--dataset", "moabb:FakeDataset", "--subjects", "11"],
     "--subjects: moabb:FakeDataset has no subject 11; its subjects are 1, 2, 3, 4, 5, 6, 7, 8, 9, 10"),
    (["--dataset", "moabb:FakeDataset", "--paradigm", "p300"],
     "--paradigm p300 does not fit --dataset moabb:FakeDataset (paradigm 'imagery', events fake1, fake2, fake3)"),
    (["--dataset", "eeg-synthetic", "--subjects", "1"],
     "--subjects, --paradigm, --fmin, --fmax and --resample are for --dataset moabb:NAME; got --subjects 1 with "
     "--dataset eeg-synthetic"),
])
def test_moabb_requests_that_cannot_work_exit_2_with_one_line(argv, message, tmp_path, mne_data, capsys):
    out = tmp_path / "run"
    assert cli.main(["compare", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"sepconv compare: error: {message}\n" and not out.exists()
