"""Whole-model conversion to separable convolutions, and the inverse: materialising standard ones.

:func:`convert` replaces the eligible convolutions of a model by their best separable approximations
(:mod:`sepconv.decomposition`), choosing ranks per layer by an energy threshold, a fixed rank, or a
global budget of parameters or mult-adds. :func:`materialize` turns a separable layer, or a small
chain of them, back into the one standard convolution it equals.
"""

from __future__ import annotations

import copy
import fnmatch
import heapq
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from . import geometry
from .decomposition import KINDS, DecompositionReport, Factorization
from .layers.conv import dense_conv
from .weights import compose, ungroup

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


# --- materialize ---------------------------------------------------------------------------------------

def materialize(module: nn.Module) -> nn.Module:
    """The standard convolution (``torch.nn.ConvNd``, ``groups=1``) that ``module`` equals.

    ``module`` is a sepconv layer (its ``to_dense()``), a ``torch.nn.ConvNd``, or an ``nn.Sequential`` of
    them whose steps filter disjoint spatial axes (1x1 steps filter none), as :func:`sepconv.decompose`
    builds. A bias before a zero-padded step cannot be represented and raises ``ValueError``.
    """
    if isinstance(module, nn.Sequential):
        steps = [materialize(step) for step in module]
        if not steps:
            raise ValueError("materialize() needs a non-empty nn.Sequential")
        return _compose_steps(steps)
    if hasattr(module, "to_dense"):
        return module.to_dense()
    if isinstance(module, _CONVS):
        rank = module.weight.ndim - 2
        return dense_conv(ungroup(module.weight.detach(), module.groups), module.bias, module.stride,
                          geometry.normalize_padding(module.padding, rank), module.dilation, module.padding_mode)
    raise TypeError(f"module must be a sepconv layer, a torch.nn.ConvNd or an nn.Sequential of them; "
                    f"got {type(module).__name__}")


def _compose_steps(steps: list[nn.Module]) -> nn.Module:
    rank = steps[0].weight.ndim - 2
    weight, bias = steps[0].weight.detach(), steps[0].bias
    stride, dilation = list(steps[0].stride), list(steps[0].dilation)
    padding = list(geometry.normalize_padding(steps[0].padding, rank))
    owner = [0 if _acts_on(steps[0], axis) else None for axis in range(rank)]
    modes = {steps[0].padding_mode} if any(p != (0, 0) and p != "valid" for p in padding) else set()
    for index, step in enumerate(steps[1:], start=1):
        step_padding = geometry.normalize_padding(step.padding, rank)
        pads = [p != (0, 0) and p != "valid" for p in step_padding]
        if bias is not None and any(pads) and step.padding_mode == "zeros":
            raise ValueError(f"step {index} zero-pads after a biased step: the bias does not reach the borders, so "
                             "no single convolution equals this chain")
        for axis in range(rank):
            if _acts_on(step, axis):
                if owner[axis] is not None:
                    raise ValueError(f"steps {owner[axis]} and {index} both act on spatial axis {axis}; materialize() "
                                     "composes chains whose steps filter disjoint axes")
                owner[axis] = index
                stride[axis], dilation[axis], padding[axis] = step.stride[axis], step.dilation[axis], step_padding[axis]
        if any(pads):
            modes.add(step.padding_mode)
        step_weight = step.weight.detach()
        if bias is not None:  # an earlier bias passes through this step's (unpadded) taps
            carried = step_weight.sum(dim=tuple(range(2, step_weight.ndim))) @ bias
            bias = carried if step.bias is None else carried + step.bias
        else:
            bias = step.bias
        weight = compose(weight, step_weight)
    if len(modes) > 1:
        raise ValueError(f"steps pad with different padding modes {sorted(modes)}; a single convolution has one")
    mode = modes.pop() if modes else "zeros"
    return dense_conv(weight, None if bias is None else bias.detach(), tuple(stride), tuple(padding), tuple(dilation),
                      mode)


def _acts_on(conv: nn.Module, axis: int) -> bool:
    rank = conv.weight.ndim - 2
    padding = geometry.normalize_padding(conv.padding, rank)[axis]
    return conv.weight.shape[2 + axis] > 1 or conv.stride[axis] > 1 or (padding != (0, 0) and padding != "valid")


# --- convert -------------------------------------------------------------------------------------------

@dataclass
class LayerConversion:
    name: str
    report: DecompositionReport

    def row(self) -> dict:
        r = self.report
        return dict(name=self.name, kind=r.kind, rank=r.rank, full_rank=r.full_rank,
                    relative_error=r.relative_error, retained_energy=r.retained_energy,
                    params_before=r.params_before, params_after=r.params_after,
                    macs_before=r.macs_before, macs_after=r.macs_after)


@dataclass
class ConversionReport:
    """Per converted layer: rank, error, energy, params and MACs before/after; totals over the model."""

    layers: list[LayerConversion] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)   # name -> why it was left alone
    params_before: int = 0                                   # whole model
    params_after: int = 0
    macs_before: int | None = None                           # converted layers only, per image
    macs_after: int | None = None

    def to_dict(self) -> dict:
        return dict(layers=[layer.row() for layer in self.layers], skipped=self.skipped,
                    params_before=self.params_before, params_after=self.params_after,
                    macs_before=self.macs_before, macs_after=self.macs_after)

    def to_markdown(self) -> str:
        lines = ["| layer | kind | rank | relative error | retained energy | params before | params after "
                 "| MACs before | MACs after |", "|---|---|---|---|---|---|---|---|---|"]
        for layer in self.layers:
            r = layer.report
            macs = ("-", "-") if r.macs_before is None else (f"{r.macs_before:,}", f"{r.macs_after:,}")
            larger = " (larger)" if r.params_after > r.params_before else ""
            lines.append(f"| {layer.name} | {r.kind} | {r.rank}/{r.full_rank} | {r.relative_error:.4f} | "
                         f"{r.retained_energy:.6f} | {r.params_before:,} | {r.params_after:,}{larger} | {macs[0]} | "
                         f"{macs[1]} |")
        lines.append("")
        lines.append(f"Model parameters: {self.params_before:,} -> {self.params_after:,} "
                     f"({self.params_after / max(self.params_before, 1):.3f}x).")
        if self.macs_before is not None:
            lines.append(f"Mult-adds of the converted layers (per image): {self.macs_before:,} -> {self.macs_after:,} "
                         f"({self.macs_after / max(self.macs_before, 1):.3f}x).")
        for name, why in self.skipped.items():
            lines.append(f"- skipped `{name}`: {why}")
        return "\n".join(lines) + "\n"

    __str__ = to_markdown


def _input_sizes(model: nn.Module, example_input, names) -> dict[str, tuple[int, ...]]:
    """Spatial input size of each named convolution, from one forward pass."""
    sizes, handles = {}, []
    modules = dict(model.named_modules())
    for name in names:
        def hook(module, args, name=name):
            sizes[name] = tuple(args[0].shape[2:] if args[0].ndim == module.weight.ndim else args[0].shape[1:])
        handles.append(modules[name].register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    return sizes


def _eligible(model, kind, include, exclude, min_params) -> tuple[dict, dict]:
    chosen, skipped = {}, {}
    for name, module in model.named_modules():
        if not isinstance(module, _CONVS):
            continue
        if include is not None and not any(fnmatch.fnmatch(name, p) for p in include):
            continue
        if exclude is not None and any(fnmatch.fnmatch(name, p) for p in exclude):
            skipped[name] = "excluded by pattern"
            continue
        taps = math.prod(module.weight.shape[2:])
        if taps == 1:
            skipped[name] = "1x1 kernel: already pointwise"
        elif module.groups == module.in_channels:
            skipped[name] = "already depthwise"
        elif kind == "spatial" and module.weight.ndim != 4:
            skipped[name] = "kind='spatial' needs a 2-D convolution"
        elif module.weight.numel() < min_params:
            skipped[name] = f"{module.weight.numel()} weights < min_params={min_params}"
        else:
            chosen[name] = module
    return chosen, skipped


def _budget_ranks(factorizations: dict, cost, budget: float) -> dict[str, int]:
    """Ranks minimising the summed squared relative error with total cost <= budget x original cost.

    Greedy on marginal gain per unit of cost: each rank step's gain (its share of the layer's energy)
    does not increase with rank, so taking the best ratio first is optimal for a continuous budget.
    """
    ranks = {name: 1 for name in factorizations}
    spent = sum(cost(name, 1) for name in factorizations)
    limit = budget * sum(cost(name, None) for name in factorizations)
    if spent > limit:
        raise ValueError(f"the budget {budget} is below the cost of rank 1 everywhere "
                         f"({spent / max(limit / budget, 1):.4f} of the original)")

    def candidate(name):
        f, r = factorizations[name], ranks[name]
        if r >= f.full_rank:
            return None
        gain = f.retained_energy(r + 1) - f.retained_energy(r)
        step = cost(name, r + 1) - cost(name, r)
        return (-gain / max(step, 1e-12), name, step)

    heap = [c for c in (candidate(name) for name in factorizations) if c is not None]
    heapq.heapify(heap)
    while heap:
        _, name, step = heapq.heappop(heap)
        if spent + step > limit:
            continue
        spent += step
        ranks[name] += 1
        nxt = candidate(name)
        if nxt is not None:
            heapq.heappush(heap, nxt)
    return ranks


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def convert(model: nn.Module, *, kind: str = "depthwise_separable", energy: float | None = None,
            rank: int | None = None, max_error: float | None = None, budget_params: float | None = None,
            budget_macs: float | None = None, ranks: dict[str, int] | None = None, include=None, exclude=None,
            min_params: int = 0, example_input: torch.Tensor | None = None, inplace: bool = False):
    """Replace eligible convolutions by separable approximations: ``(model, report)``.

    Args:
        kind: as in :func:`sepconv.decompose`.
        energy / rank / max_error: a per-layer rule (see :func:`sepconv.decompose`); or
        budget_params / budget_macs: a global budget, as a fraction of the eligible layers' original
            parameters or mult-adds (e.g. ``0.3``); ranks are chosen to minimise the summed squared
            relative error within it. ``budget_macs`` needs ``example_input``; or
        ranks: ``{layer name: rank}`` (as in an earlier report): exactly those layers at those ranks.
        include / exclude: ``fnmatch`` patterns on module names (``"features.*"``).
        min_params: leave convolutions with fewer weights alone.
        example_input: a batch for one forward pass, to learn each layer's input size (MACs).
        inplace: modify ``model``; by default a deep copy is converted and ``model`` is left untouched.

    1x1 and depthwise convolutions are left alone (they are already the factors).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    rules = [n for n, v in (("energy", energy), ("rank", rank), ("max_error", max_error), ("budget_params", budget_params),
                            ("budget_macs", budget_macs), ("ranks", ranks)) if v is not None]
    if len(rules) > 1:
        raise ValueError(f"give at most one of energy, rank, max_error, budget_params, budget_macs, ranks; "
                         f"got {', '.join(rules)}")
    for name, value in (("budget_params", budget_params), ("budget_macs", budget_macs)):
        if value is not None and not 0 < value <= 1:
            raise ValueError(f"{name} must be a fraction in (0, 1]; got {value!r}")
    if budget_macs is not None and example_input is None:
        raise ValueError("budget_macs needs example_input (a batch) to learn each layer's input size")
    include = [include] if isinstance(include, str) else include
    exclude = [exclude] if isinstance(exclude, str) else exclude

    target = model if inplace else copy.deepcopy(model)
    chosen, skipped = _eligible(target, kind, list(ranks) if ranks is not None else include, exclude, min_params)
    if ranks is not None and set(ranks) != set(chosen):
        raise ValueError(f"ranks names layers that are not eligible convolutions of this model: "
                         f"{sorted(set(ranks) - set(chosen))}")
    sizes = _input_sizes(target, example_input, list(chosen)) if example_input is not None else {}
    factorizations = {name: Factorization(module, kind) for name, module in chosen.items()}

    if budget_params is not None or budget_macs is not None:
        if budget_params is not None:
            def cost(name, r):  # r None: the original layer
                f = factorizations[name]
                return sum(p.numel() for p in f.conv.parameters()) if r is None else f.params(r)
        else:
            def cost(name, r):
                f, size = factorizations[name], sizes[name]
                return f.macs_before(size) if r is None else f.macs(r, size)
        ranks = _budget_ranks(factorizations, cost, budget_params if budget_params is not None else budget_macs)
    elif ranks is not None:
        ranks = {name: factorizations[name].choose_rank(ranks[name]) for name in factorizations}
    else:
        ranks = {name: f.choose_rank(rank, energy, max_error) for name, f in factorizations.items()}

    report = ConversionReport(skipped=skipped, params_before=sum(p.numel() for p in model.parameters()))
    for name, f in factorizations.items():
        module = f.build(ranks[name])
        module.train(f.conv.training)
        report.layers.append(LayerConversion(name, f.report(ranks[name], module, sizes.get(name))))
        _set_module(target, name, module)
    report.params_after = sum(p.numel() for p in target.parameters())
    if sizes:
        report.macs_before = sum(layer.report.macs_before for layer in report.layers)
        report.macs_after = sum(layer.report.macs_after for layer in report.layers)
    return target, report


def load_converted(path, model: nn.Module) -> nn.Module:
    """Rebuild a model saved by ``sepconv decompose`` from a state dict: convert ``model`` (the original
    architecture) to the saved kind and ranks, then load the saved weights. Loads with ``weights_only=True`` and
    checks the file's digest: a damaged file raises :class:`~sepconv._io.CheckpointError` (a ``ValueError``)."""
    from ._io import load_checkpoint

    bundle = load_checkpoint(path)
    if bundle.get("format") != "sepconv.converted/1":
        raise ValueError(f"{path} is not a file written by `sepconv decompose` from a state dict")
    converted, _ = convert(model, kind=bundle["kind"], ranks=bundle["ranks"], inplace=True)
    converted.load_state_dict(bundle["state_dict"])
    return converted
