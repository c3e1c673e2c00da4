"""Helpers shared by several test modules; test modules import from here, never from one another.

pytest puts ``tests/`` on ``sys.path`` (the default ``prepend`` import mode, no ``__init__.py``), so test
modules write ``from helpers import ...``.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st
from torch import nn

# sepconv's command line and data modules are imported where used, so that a test module that needs only the
# geometry strategy imports no more of sepconv than it did before.

# --- command line --------------------------------------------------------------------------------------------

def run_cli(argv, capsys) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``sepconv ARGV``, whether the command returns or argparse exits."""
    from sepconv import cli

    try:
        code = cli.main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- datasets ------------------------------------------------------------------------------------------------

def write_cifar(directory: Path, images_per_batch: int = 6) -> None:
    """A CIFAR-10 python directory in the real format (protocol-2 pickles of bytes-keyed dicts), small."""
    from sepconv.experiment.data import CIFAR_FILES

    directory.mkdir(parents=True)
    generator = np.random.default_rng(0)
    for index, name in enumerate(CIFAR_FILES[:-1]):
        batch = {b"batch_label": f"batch {index}".encode(), b"labels": [int(n) for n in
                 generator.integers(0, 10, images_per_batch)],
                 b"data": generator.integers(0, 256, (images_per_batch, 3072), dtype=np.uint8),
                 b"filenames": [f"image_{i}.png".encode() for i in range(images_per_batch)]}
        (directory / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"label_names": [name.encode() for name in ("airplane", "automobile", "bird", "cat", "deer", "dog",
                                                         "frog", "horse", "ship", "truck")],
            b"num_cases_per_batch": images_per_batch, b"num_vis": 3072}
    (directory / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))


# --- models --------------------------------------------------------------------------------------------------

def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` as Keras counts them: total adds the BN moving mean and variance."""
    trainable = sum(p.numel() for p in model.parameters())
    statistics = sum(b.numel() for name, b in model.named_buffers() if name.endswith(("running_mean", "running_var")))
    return trainable, trainable + statistics


# --- convolution geometry: an independent reference and a hypothesis strategy ----------------------------------

PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]


def reference_pairs(padding, n, k, s, d):
    """(before, after) padding per axis, from the Keras/TensorFlow formulas of the project's shared reference
    (REFERENCE.md, "Semantics to match"; not part of this repository), independently of :mod:`sepconv.geometry`:
    'same': out = ceil(n/s), total = max((out-1)*s + k_eff - n, 0), the extra element after;
    'causal': k_eff - 1 before."""
    rank = len(n)
    if isinstance(padding, int):
        padding = (padding,) * rank
    elif padding == "causal":
        padding = ("same",) * (rank - 1) + ("causal",)
    elif isinstance(padding, str):
        padding = (padding,) * rank
    pairs = []
    for p, ni, ki, si, di in zip(padding, n, k, s, d):
        k_eff = (ki - 1) * di + 1
        if p == "valid":
            pairs.append((0, 0))
        elif p == "causal":
            pairs.append((k_eff - 1, 0))
        elif p == "same":
            total = max((math.ceil(ni / si) - 1) * si + k_eff - ni, 0)
            pairs.append((total // 2, total - total // 2))
        elif isinstance(p, int):
            pairs.append((p, p))
        else:
            pairs.append(tuple(p))
    return pairs


@st.composite
def geometry_case(draw, rank=None, max_kernel=4):
    """A valid convolution geometry: size, kernel, stride, dilation, padding (every form) and padding mode."""
    rank = draw(st.integers(1, 3)) if rank is None else rank
    max_size = {1: 14, 2: 9, 3: 6}[rank]
    kernel = tuple(draw(st.integers(1, max_kernel)) for _ in range(rank))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    dilation = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    size = tuple(draw(st.integers(1, max_size)) for _ in range(rank))
    padding = draw(st.one_of(
        st.sampled_from(["valid", "same", "causal"]),
        st.integers(0, 2),
        st.tuples(*[st.one_of(st.tuples(st.integers(0, 3), st.integers(0, 3)),
                              st.sampled_from(["same", "valid", "causal"]),
                              st.integers(0, 2)) for _ in range(rank)]),
    ))
    mode = draw(st.sampled_from(PADDING_MODES))
    pairs = reference_pairs(padding, size, kernel, stride, dilation)
    for n, k, d, (before, after) in zip(size, kernel, dilation, pairs):
        assume(n + before + after >= (k - 1) * d + 1)
        assume(mode != "reflect" or max(before, after) < n)
        assume(mode != "circular" or max(before, after) <= n)
    return dict(size=size, kernel=kernel, stride=stride, dilation=dilation, padding=padding, padding_mode=mode)
