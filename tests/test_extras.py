"""The lean core install: ``import sepconv`` loads no optional dependency, the core works without any of them,
and a feature whose extra is missing says, in one line, which extra to install."""

import subprocess
import sys
import textwrap

import pytest

from sepconv._extras import MissingExtra, require

OPTIONAL = ("matplotlib", "sklearn", "tqdm", "pooch", "mne", "moabb")  # what the extras install

# Run first in a subprocess: these packages then import as if they were not installed (pip install . alone).
# The path finder is replaced rather than preceded, so that importlib.util.find_spec (which torch calls) says
# "not installed" too.
UNINSTALL = f"""
import importlib.machinery, sys

class Uninstalled(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in {OPTIONAL!r}:
            return None
        return super().find_spec(name, path, target)

sys.meta_path[sys.meta_path.index(importlib.machinery.PathFinder)] = Uninstalled
"""


def _python(code: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_import_sepconv_and_its_command_line_load_no_optional_dependency():
    result = _python("""
        import sys
        import sepconv, sepconv.cli, sepconv.experiment, sepconv.profiling
        print(sorted(name for name in sys.modules if name.partition(".")[0] in ("matplotlib", "sklearn", "pooch",
                                                                                "mne", "moabb")))
    """)
    assert result.stdout.strip() == "[]"


def test_the_core_works_without_the_extras_and_each_feature_names_its_extra(tmp_path):
    result = _python(UNINSTALL + f"""
import torch, sepconv
from sepconv import cli, functional
from sepconv.experiment import load_dataset

layer = sepconv.SeparableConv2d(4, 8, 3, stride=2, padding="same")
x = torch.randn(2, 4, 9, 9, requires_grad=True)
layer(x).sum().backward()
torch.testing.assert_close(layer.to_dense()(x), layer(x))
assert sepconv.cost.layer_cost(layer, (2, 4, 9, 9)).macs > 0
conv = torch.nn.Conv2d(4, 8, 3)
module, report = sepconv.decompose(conv, rank=2)
model = sepconv.models.create_model("digits_cnn", separable=True)
assert sepconv.profile(model, (1, 1, 8, 8)).total_macs > 0
print("core ok")

for call in (lambda: load_dataset("digits"), lambda: sepconv.distill(model, model, [], 1),
             lambda: load_dataset("eeg-mne", {str(tmp_path)!r}), lambda: load_dataset("moabb:FakeDataset")):
    try:
        call()
    except ImportError as error:
        print(error)
code = cli.main(["compare", "--out", {str(tmp_path / "run")!r}])
print("exit", code)
""")
    lines = result.stdout.splitlines()
    assert lines == ["core ok",
                     "--dataset digits needs scikit-learn, which is not installed: pip install 'sepconv[experiment]'",
                     "sepconv.distill needs tqdm, which is not installed: pip install 'sepconv[experiment]'",
                     "--dataset eeg-mne needs mne, which is not installed: pip install 'sepconv[eeg]'",
                     "--dataset moabb:FakeDataset needs mne, which is not installed: pip install 'sepconv[eeg]'",
                     "exit 2"]
    assert result.stderr == ("sepconv compare: error: sepconv compare needs matplotlib, which is not installed: "
                             "pip install 'sepconv[experiment]'\n")
    assert not (tmp_path / "run").exists()


def test_require_names_the_extra_and_passes_through_a_broken_package(tmp_path, monkeypatch):
    assert require("json", "experiment", "anything").dumps([]) == "[]"
    with pytest.raises(MissingExtra, match=r"^the feature needs sepconv_no_such_package, which is not installed: "
                                           r"pip install 'sepconv\[eeg\]'$"):
        require("sepconv_no_such_package.sub", "eeg", "the feature")
    (tmp_path / "sepconv_broken_package.py").write_text("import sepconv_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="sepconv_missing_dependency") as error:
        require("sepconv_broken_package", "eeg", "the feature")
    assert not isinstance(error.value, MissingExtra)
