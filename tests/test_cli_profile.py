"""`sepconv profile`: the table and the other formats, measuring with a roofline, and one-line user errors."""

import csv
import io
import json
import os
import subprocess
import sys

import pytest

from helpers import run_cli

FACTORIES = '''
import torch.nn as nn
import sepconv

def build():
    return nn.Sequential(sepconv.SeparableConv2d(3, 8, 3, padding="same", bias=False), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 5))

def broken():
    raise RuntimeError("weights file missing;\\nsee the docs")

def not_a_model():
    return 42
'''
# By hand, on 1x3x8x8: depthwise 3 * 9 * 64, pointwise 8 * 3 * 64, FC 8 * 5 multiply-adds.
TINY_MACS = 3 * 9 * 64 + 8 * 3 * 64 + 8 * 5


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "tiny_models.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tiny_models", raising=False)
    return tmp_path


def test_table(factories, capsys):
    code, out, err = run_cli(["profile", "tiny_models:build", "--input", "1x3x8x8"], capsys)
    assert code == 0 and err == ""
    assert "Sequential on input 1x3x8x8 (float32): 3 counted ops" in out
    assert "0[0]" in out and "depthwise conv" in out and "fully connected" in out
    assert f"forward {TINY_MACS:,} MACs = {2 * TINY_MACS:,} FLOPs" in out


@pytest.mark.parametrize("output_format", ["csv", "json", "markdown"])
def test_formats(factories, capsys, output_format):
    code, out, _ = run_cli(["profile", "tiny_models:build", "--input", "1x3x8x8", "--format", output_format], capsys)
    assert code == 0
    if output_format == "csv":
        rows = list(csv.DictReader(io.StringIO(out)))
        assert [row["kind"] for row in rows] == ["depthwise conv", "pointwise conv", "fully connected"]
        assert sum(int(row["macs"]) for row in rows) == TINY_MACS
    elif output_format == "json":
        assert json.loads(out)["totals"]["macs"] == TINY_MACS
    else:
        assert out.startswith("### Sequential") and "| layer | kind |" in out


def test_measure_backward_roofline(factories, capsys):
    png = factories / "out" / "roofline.png"
    code, out, err = run_cli(["profile", "tiny_models:build", "--input", "1x3x8x8", "--backward", "--roofline",
                              str(png), "--format", "json", "--repeats", "2", "--warmup", "0"], capsys)
    assert code == 0, err
    document = json.loads(out)  # stdout stays machine-readable; the note about the file goes to stderr
    assert all(row["forward_ms"] is not None and row["backward_ms"] is not None for row in document["rows"])
    assert document["machine"]["memory_bandwidth_bytes_per_s"] > 0 and document["model_time"]["repeats"] == 2
    assert png.read_bytes()[:4] == b"\x89PNG" and f"wrote the roofline plot to {png}" in err


def test_registry_name(capsys):
    models = pytest.importorskip("sepconv.models")
    if "mobilenet_v1" not in models.list_models():
        pytest.skip("no mobilenet_v1 in the registry")
    code, out, _ = run_cli(["profile", "mobilenet_v1", "--format", "json"], capsys)
    assert code == 0 and json.loads(out)["totals"]["macs"] == 568_740_352  # MobileNets paper, Table 1 / 4


def one_error_line(code, out, err) -> str:
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("sepconv profile: error: ") and "Traceback" not in err
    return err


@pytest.mark.parametrize("argv, message", [
    (["tiny_models:build", "--input", "1x3"],
     "argument --input: --input must be 3 or 4 or 5 positive sizes like 1x3x224x224 (N x C x H x W); got '1x3'"),
    (["tiny_models:build", "--input", "axb"], "argument --input: --input must look like 1x3x224x224"),
    (["tiny_models:build", "--input", "1x4x8x8"],
     "input 1x4x8x8 does not fit Sequential: ValueError: x has 4 channels but the layer has in_channels = 3"),
    (["tiny_models:build", "--format", "xml"], "argument --format: invalid choice: 'xml'"),
    (["tiny_models:build", "--repeats", "0"], "argument --repeats: must be an int from 1 to 10000; got '0'"),
    (["tiny_models:missing"], "MODEL 'tiny_models:missing': cannot import 'missing' from 'tiny_models'"),
    (["no_such_package.module:build"], "cannot import 'build' from 'no_such_package.module'"),
    (["tiny_models:broken"], "MODEL 'tiny_models:broken': building it failed with RuntimeError: weights file "
                             "missing; see the docs"),
    (["tiny_models:not_a_model"], "MODEL 'tiny_models:not_a_model' returned a int, not a torch.nn.Module"),
    ([], "the following arguments are required: MODEL"),
])
def test_user_errors_are_one_line_exit_2(factories, capsys, argv, message):
    assert message in one_error_line(*run_cli(["profile", *argv], capsys))


def test_unknown_registry_name_lists_what_is_accepted(capsys):
    pytest.importorskip("sepconv.models")
    err = one_error_line(*run_cli(["profile", "no_such_model"], capsys))
    assert "MODEL 'no_such_model': unknown model name 'no_such_model'" in err
    assert "MODEL must be a registered name (" in err and "or package.module:factory" in err


def test_unwritable_roofline(factories, capsys):
    blocker = factories / "a_file"
    blocker.write_text("")
    err = one_error_line(*run_cli(["profile", "tiny_models:build", "--input", "1x3x8x8", "--repeats", "1",
                                   "--warmup", "0", "--roofline", str(blocker / "roofline.png")], capsys))
    assert f"cannot write --roofline {blocker / 'roofline.png'}" in err


def test_entry_point_has_no_traceback(factories):
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(factories), *sys.path])}
    result = subprocess.run([sys.executable, "-m", "sepconv", "profile", "tiny_models:missing"], capture_output=True,
                            text=True, timeout=120, env=environment)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_roofline_path_is_checked_before_measuring_and_a_replaced_file_is_said(factories, capsys, monkeypatch):
    import sepconv.commands.profile as profile_module
    monkeypatch.setattr(profile_module, "profile", lambda *args, **kwargs: pytest.fail("measured"))
    for path in ("", str(factories)):
        err = one_error_line(*run_cli(["profile", "tiny_models:build", "--roofline", path], capsys))
        assert "must name a PNG file" in err
    monkeypatch.undo()
    png = factories / "mine.png"
    png.write_bytes(b"the user's plot")
    code, _, err = run_cli(["profile", "tiny_models:build", "--input", "1x3x8x8", "--repeats", "1", "--warmup", "0",
                            "--roofline", str(png)], capsys)
    assert code == 0 and f"wrote the roofline plot to {png} (it replaced the file there)" in err
