"""Data by name: CIFAR-10 downloaded from a local HTTP server exactly as from the real host (only the URL and
checksum overridden), the cache, and every way a download can fail."""

import hashlib
import http.server
import io
import json
import socket
import tarfile
import threading
import types

import pytest

from sepconv import cli
from sepconv.experiment import DataError, download, load_dataset
from sepconv.experiment.data import CIFAR_FILES, CIFAR_FOLDER
from test_compare import _write_cifar

ARCHIVE = "cifar-10-python.tar.gz"


def _tarball(tmp_path, extra=None) -> bytes:
    """A gzipped tarball in the real CIFAR-10 layout (``cifar-10-batches-py/...``), a few images per batch;
    ``extra(tar)`` may add members."""
    _write_cifar(tmp_path / "source" / CIFAR_FOLDER)
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
