"""The `sepconv` command line: the worked cost example and its argument errors."""

import subprocess
import sys

import pytest

from sepconv import cli


def test_example_prints_reference_counts(capsys):
    assert cli.main(["example", "--no-measure"]) == 0
    out = capsys.readouterr().out
    # REFERENCE.md: 3x3 conv 3->64 = 1,728 weights + 64 biases; K=3, C_out=64 -> 7.89x fewer mult-adds.
    assert "1,728" in out and "7.89x fewer" in out
    assert "86,704,128" in out  # 1728 weights x 224 x 224 positions
    assert "closed form M/C_out + M/K^2 = 1/64 + 1/9 = 0.1267" in out


def test_example_measures_time(capsys):
    assert cli.main(["example", "--input", "1x8x16x16", "--out-channels", "16"]) == 0
    out = capsys.readouterr().out
    assert "forward ms (median ± IQR)" in out and "measured forward speed-up" in out


@pytest.mark.parametrize("argv, message", [
    (["example", "--input", "1x3"], "--input must be 4 positive sizes like 1x3x224x224 (N x C x H x W); got '1x3'"),
    (["example", "--input", "axb"], "--input must look like 1x3x224x224"),
    (["example", "--padding", "full"],
     "argument --padding: must be same, valid, causal or an int from 0 to 2147483647; got 'full'"),
])
def test_bad_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_geometry_error_is_one_line_and_exit_2(capsys):
    assert cli.main(["example", "--input", "1x3x2x2", "--padding", "valid", "--no-measure"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "smaller than the effective kernel size 3" in err


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "sepconv", "example", "--no-measure", "--input", "1x4x8x8"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "separable / standard" in result.stdout
