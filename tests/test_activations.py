"""sepconv.activations: one list of the fused activations, in the C++ kernels' order, computed as PyTorch's modules."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from sepconv import activations

COMMON_H = Path(activations.__file__).parent / "kernels" / "cpu" / "common.h"
MODULES = {"none": nn.Identity(), "relu": nn.ReLU(), "relu6": nn.ReLU6(), "elu": nn.ELU(0.7), "silu": nn.SiLU(),
           "hardswish": nn.Hardswish(), "gelu": nn.GELU(), "leaky_relu": nn.LeakyReLU(0.2)}


def test_the_cpp_enum_lists_the_fused_activations_in_their_code_order():
    enum = re.search(r"enum class Act : int64_t \{([^}]*)\}", COMMON_H.read_text())
    assert enum, f"no 'enum class Act' in {COMMON_H}"
    names = [entry.split("=")[0].strip().lower() for entry in enum.group(1).split(",")]
    assert names == [name.replace("_", "") for name in activations.FUSED]
    assert [activations.code(name) for name in activations.FUSED] == list(range(len(activations.FUSED)))


def test_trainable_ones_are_fused_ones_with_the_same_codes():
    assert activations.FUSED[:len(activations.TRAINABLE)] == activations.TRAINABLE


@pytest.mark.parametrize("name", activations.FUSED)
def test_each_module_maps_to_its_name_and_computes_the_same(name):
    module = MODULES[name]
    found, alpha = activations.of_module(module)
    assert found == name
    x = torch.linspace(-8, 8, 101)
    torch.testing.assert_close(activations.apply(x, found, alpha), module(x))


def test_other_modules_are_not_fused_and_bad_names_are_one_line_errors():
    assert activations.of_module(nn.Tanh()) is None
    assert activations.of_module(nn.GELU(approximate="tanh")) is None
    assert activations.of_module(nn.Hardtanh(-1, 1)) is None
    assert activations.of_module(nn.Hardtanh(0, 6)) == ("relu6", 1.0)
    with pytest.raises(ValueError, match=r"^activation must be one of none, relu, relu6; got 'gelu'$"):
        activations.check("gelu", activations.TRAINABLE)
    with pytest.raises(ValueError, match=r"^pw_activation must be one of none, .*, leaky_relu; got 'tanh'$"):
        activations.check("tanh", argument="pw_activation")
