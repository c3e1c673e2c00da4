"""Model conversion, materialisation, distillation and `sepconv decompose`, end to end."""

import os

import pytest
import torch
from torch import nn

import sepconv
from sepconv import cli
from sepconv.conversion import convert, load_converted, materialize
from sepconv.decomposition import decompose
from sepconv.distillation import distill


def small_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding="same", groups=2), nn.ReLU(),
        nn.Conv2d(32, 32, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))


# --- materialize ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["depthwise_separable", "pointwise_depthwise", "spatial"])
def test_materialize_inverts_decompose(kind):
    torch.manual_seed(0)
    conv = sepconv.Conv2d(4, 6, 3, stride=2, padding="same", groups=2, padding_mode="circular").double()
    module, _ = decompose(conv, kind)
    dense = materialize(module)
    assert isinstance(dense, nn.Conv2d) and dense.groups == 1
    x = torch.randn(2, 4, 9, 10, dtype=torch.float64)
    torch.testing.assert_close(dense(x), conv(x))


def test_materialize_sepconv_layers_and_plain_convs():
    layer = sepconv.SeparableConv2d(3, 5, 3, padding=1)
    assert torch.equal(materialize(layer).weight, layer.to_dense().weight)
    grouped = nn.Conv2d(4, 6, 3, groups=2)
    x = torch.randn(1, 4, 7, 7)
    torch.testing.assert_close(materialize(grouped)(x), grouped(x))


def test_materialize_refuses_what_no_single_convolution_equals():
    with pytest.raises(ValueError, match=r"steps 0 and 1 both act on spatial axis 0"):
        materialize(nn.Sequential(nn.Conv2d(2, 2, 3), nn.Conv2d(2, 2, 3)))
    with pytest.raises(ValueError, match=r"step 1 zero-pads after a biased step"):
        materialize(nn.Sequential(nn.Conv2d(2, 2, (3, 1), bias=True), nn.Conv2d(2, 2, (1, 3), padding=(0, 1))))
    with pytest.raises(TypeError, match=r"got ReLU"):
        materialize(nn.ReLU())
    # a bias before an unpadded step is carried through it exactly
    chain = nn.Sequential(nn.Conv2d(2, 3, (3, 1), padding=(1, 0)), nn.Conv2d(3, 4, (1, 3)))
    x = torch.randn(1, 2, 6, 6)
    torch.testing.assert_close(materialize(chain)(x), chain(x), atol=1e-6, rtol=1e-5)


# --- convert -------------------------------------------------------------------------------------------

def test_convert_exact_at_full_energy_and_leaves_the_original_alone():
    model = small_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 1, 12, 12)
    converted, report = convert(model, energy=1.0, example_input=x)
    torch.testing.assert_close(converted(x), model(x), atol=1e-5, rtol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [layer.name for layer in report.layers] == ["2", "4"]
    # one input channel: groups == in_channels, so layer 0 already is a depthwise convolution (multiplier 16)
    assert report.skipped == {"0": "already depthwise", "6": "1x1 kernel: already pointwise"}
    assert isinstance(converted[2], sepconv.SeparableConv2d) and isinstance(converted[4], nn.Sequential)
    assert report.macs_before == 16 * 32 * 9 * 36 + 32 * 16 * 9 * 36
    assert report.params_before == sum(p.numel() for p in model.parameters())
    assert report.params_after == sum(p.numel() for p in converted.parameters())


def test_convert_inplace_include_exclude_and_ranks():
    model = small_cnn()
    converted, report = convert(model, rank=1, include=["2", "4"], exclude="4", inplace=True)
    assert converted is model and [layer.name for layer in report.layers] == ["2"]
    assert report.skipped["4"] == "excluded by pattern"
    assert isinstance(model[2], sepconv.SeparableConv2d) and model[2].depth_multiplier == 1
    again, _ = convert(small_cnn(), ranks={"2": 2, "4": 3})
    assert again[2].depth_multiplier == 2 and again[4].depthwise.depth_multiplier == 3
    with pytest.raises(ValueError, match=r"ranks names layers that are not eligible .*\['6'\]"):
        convert(small_cnn(), ranks={"6": 1})


@pytest.mark.parametrize("budget", ["budget_params", "budget_macs"])
def test_convert_meets_a_global_budget_with_least_error(budget):
    model = small_cnn()
    x = torch.randn(1, 1, 12, 12)

    def spent_and_original(report):
        if budget == "budget_params":
            return (sum(r.report.params_after for r in report.layers), sum(r.report.params_before for r in report.layers))
        return report.macs_after, report.macs_before

    def squared_error(report):
        return sum(layer.report.relative_error ** 2 for layer in report.layers)

    for fraction in (0.2, 0.35, 0.6):
        _, report = convert(model, example_input=x, **{budget: fraction})
        spent, original = spent_and_original(report)
        assert spent <= fraction * original
        ranks = {layer.name: layer.report.rank for layer in report.layers}
        # the greedy stopped because the budget is spent: no single extra rank step still fits
        for layer in report.layers:
            if layer.report.rank < layer.report.full_rank:
                _, bigger = convert(model, example_input=x, ranks={**ranks, layer.name: layer.report.rank + 1})
                assert spent_and_original(bigger)[0] > fraction * original
        # and no uniform rank within the same budget has less error
        for uniform in range(1, 10):
            _, same_rank = convert(model, example_input=x, ranks=dict.fromkeys(ranks, uniform))
            if spent_and_original(same_rank)[0] <= fraction * original:
                assert squared_error(report) <= squared_error(same_rank) + 1e-12
    with pytest.raises(ValueError, match=r"the budget 0.01 is below the cost of rank 1 everywhere"):
        convert(model, example_input=x, **{budget: 0.01})


def test_convert_argument_errors():
    model = small_cnn()
    with pytest.raises(ValueError, match=r"give at most one of .*; got energy, rank"):
        convert(model, energy=0.9, rank=2)
    with pytest.raises(ValueError, match=r"budget_macs needs example_input"):
        convert(model, budget_macs=0.5)
    with pytest.raises(ValueError, match=r"budget_params must be a fraction in \(0, 1\]; got 2"):
        convert(model, budget_params=2)


# --- a trained CNN: accuracy after conversion and after distillation ------------------------------

def bars_dataset(n, seed):
    """Synthetic 12x12 images of one oriented bar (4 classes: -, |, \\, /) at a random place, with noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=generator)
    images = torch.randn(n, 1, 12, 12, generator=generator) * 0.6
    offsets = torch.randint(2, 10, (n, 2), generator=generator)
    line = torch.arange(-2, 3)
    for i in range(n):
        r, c = offsets[i].tolist()
        rows, cols = {0: (r + 0 * line, c + line), 1: (r + line, c + 0 * line), 2: (r + line, c + line),
                      3: (r + line, c - line)}[int(labels[i])]
        images[i, 0, rows.clamp(0, 11), cols.clamp(0, 11)] += 2.0
    return images, labels


def accuracy(model, images, labels):
    with torch.no_grad():
        return float((model(images).argmax(1) == labels).float().mean())


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = small_cnn()
    train_x, train_y = bars_dataset(1024, seed=1)
    test_x, test_y = bars_dataset(512, seed=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(12):
        for i in range(0, len(train_x), 64):
            loss = nn.functional.cross_entropy(model(train_x[i:i + 64]), train_y[i:i + 64])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval(), (train_x, train_y), (test_x, test_y)


def test_accuracy_after_conversion_and_recovery_by_distillation(trained, tmp_path, capsys):
    model, (train_x, train_y), (test_x, test_y) = trained
    original = accuracy(model, test_x, test_y)
    assert original > 0.8
    rows = [("original", original, sum(p.numel() for p in model.parameters()))]
    for energy in (0.5, 0.8, 0.95, 1.0):
        converted, report = convert(model, energy=energy)
        rows.append((f"energy {energy}", accuracy(converted.eval(), test_x, test_y), report.params_after))
    assert rows[-1][1] == original  # exact at full energy
    student, report = convert(model, energy=0.5)
    before = accuracy(student.eval(), test_x, test_y)
    batches = [(train_x[i:i + 64],) for i in range(0, len(train_x), 64)]
    history = distill(student, model, batches, epochs=4, lr=2e-3, checkpoint=tmp_path / "distill.pt", progress=False)
    after = accuracy(student.eval(), test_x, test_y)
    rows.append(("energy 0.5 + distillation (4 epochs)", after, report.params_after))
    with capsys.disabled():
        print("\n" + "\n".join(f"  {name:<38} test accuracy {acc:.3f}  params {params:,}" for name, acc, params in rows))
    assert history[-1] < history[0]
    assert after > before


def test_distill_resumes_from_its_checkpoint(trained, tmp_path):
    model, (train_x, _), _ = trained
    batches = [train_x[i:i + 128] for i in range(0, 512, 128)]
    straight, _ = convert(model, rank=1)
    torch.manual_seed(5)
    full_history = distill(straight, model, batches, epochs=3, checkpoint=tmp_path / "a.pt", progress=False)
    interrupted, _ = convert(model, rank=1)
    torch.manual_seed(5)
    distill(interrupted, model, batches, epochs=2, checkpoint=tmp_path / "b.pt", progress=False)
    resumed, _ = convert(model, rank=1)
    optimizer = torch.optim.Adam(resumed.parameters(), lr=1e-3)
    history = distill(resumed, model, batches, epochs=3, optimizer=optimizer, checkpoint=tmp_path / "b.pt",
                      progress=False)
    assert history == pytest.approx(full_history, rel=1e-6)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b)


# --- the command line ----------------------------------------------------------------------------------

def test_cli_decompose_state_dict_round_trip(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "toy_models.py").write_text(
        "import torch\nfrom torch import nn\n\ndef cnn():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2))\n")
    import toy_models
    torch.save(toy_models.cnn().state_dict(), tmp_path / "in.pt")
    code = cli.main(["decompose", str(tmp_path / "in.pt"), "-o", str(tmp_path / "out.pt"), "--model", "toy_models:cnn",
                     "--budget-macs", "0.5", "--input", "1x3x16x16", "--report", str(tmp_path / "report.md")])
    assert code == 0
    out = capsys.readouterr().out
    assert "Mult-adds of the converted layers (per image)" in out
    assert (tmp_path / "report.md").read_text().startswith("# Decomposition of")
    reloaded = load_converted(tmp_path / "out.pt", toy_models.cnn())
    bundle = torch.load(tmp_path / "out.pt", weights_only=True)
    assert set(bundle["ranks"]) == {"0", "2"}
    x = torch.randn(1, 3, 16, 16)
    converted, _ = convert(toy_models.cnn(), ranks=bundle["ranks"])
    torch.testing.assert_close(reloaded(x), converted(x))


def test_cli_decompose_refuses_pickles_without_trust(tmp_path, capsys):
    model = small_cnn()
    torch.save(model, tmp_path / "model.pt")
    assert cli.main(["decompose", str(tmp_path / "model.pt"), "-o", str(tmp_path / "out.pt")]) == 2
    assert "holds pickled objects, which run code when loaded; pass --trust-pickle" in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()
    assert cli.main(["decompose", str(tmp_path / "model.pt"), "-o", str(tmp_path / "out.pt"), "--trust-pickle",
                     "--energy", "0.9"]) == 0
    converted = torch.load(tmp_path / "out.pt", weights_only=False)
    assert isinstance(converted[2], sepconv.SeparableConv2d)


@pytest.mark.parametrize("argv, message", [
    (["decompose", "missing.pt", "-o", "x.pt"], "missing.pt: no such file"),
    (["decompose", "{sd}", "-o", "x.pt"], "a state dict needs --model"),
    (["decompose", "{sd}", "-o", "x.pt", "--model", "nowhere_pkg:f"], "MODEL 'nowhere_pkg:f': cannot import"),
    (["decompose", "{sd}", "-o", "x.pt", "--model", "torch.nn:Identity", "--energy", "0.9"],
     "does not fit --model torch.nn:Identity: Unexpected key(s) in state_dict"),
])
def test_cli_decompose_user_errors_exit_2(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(small_cnn().state_dict(), tmp_path / "sd.pt")
    argv = [a.replace("{sd}", str(tmp_path / "sd.pt")) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "x.pt").exists()


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    from sepconv._io import atomic_path, atomic_save
    target = tmp_path / "keep.pt"
    atomic_save({"a": torch.ones(2)}, target)
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.pt"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would create it, not mkstemp's 0600
