"""``sepconv decompose``: turn a trained model's convolutions into separable ones, and save the result.

IN.pt is loaded safely (``torch.load(weights_only=True)``): a state dict, with ``--model`` naming the
architecture (a registry name or ``package.module:factory``). A whole pickled model runs code when loaded,
so it is accepted only with ``--trust-pickle``. The output is written atomically: a state-dict bundle
``{"format", "model", "kind", "ranks", "state_dict"}`` with a digest of its content (reload it with
``sepconv.load_converted``), or a pickled model when the input was one. IN.pt, OUT.pt and REPORT.md must be three
different files; an existing OUT.pt or REPORT.md is replaced only with ``--force``.
"""

from __future__ import annotations

import math
import os
import sys

import torch
from torch import nn

from .._io import (CheckpointError, PickledCheckpoint, WriteError, atomic_save, atomic_write_text, check_writable,
                   load_checkpoint, same_file, save_checkpoint)
from ..conversion import KINDS, convert
from ._args import UsageError, at_least, build_model, check_memory, number_in, parse_shape

FORMAT = "sepconv.converted/1"


def _check_paths(args) -> None:
    """IN.pt, OUT.pt and REPORT.md: distinct, IN.pt a file, nothing of the user's replaced without --force, and the
    outputs writable; checked before anything is read or written."""
    paths = {"IN.pt": args.input_path, "-o": args.output, "--report": args.report}
    for name, path in paths.items():
        if path == "":
            raise UsageError(f"{name} must name a file; got ''")
    if not os.path.exists(args.input_path):
        raise UsageError(f"{args.input_path}: no such file")
    if os.path.isdir(args.input_path):
        raise UsageError(f"{args.input_path} is a directory; IN.pt must be a file")
    named = [(name, path) for name, path in paths.items() if path is not None]
    for index, (name, path) in enumerate(named):
        for other_name, other in named[index + 1:]:
            if same_file(path, other):
                raise UsageError(f"{name} {path} and {other_name} {other} are the same file; each must be its own")
    for name, path in named[1:]:
        if os.path.isdir(path):
            raise UsageError(f"{name} {path} is a directory; it must name a file")
        if os.path.exists(path) and not args.force:
            raise UsageError(f"{name} {path} exists; pass --force to replace it")
        try:
            check_writable(path, name)
        except ValueError as error:
            raise UsageError(str(error)) from None


def _load(args) -> tuple[nn.Module, str | None]:
    if args.trust_pickle:
        if args.model is not None:
            raise UsageError("--model names the architecture of a state dict; --trust-pickle loads a whole pickled "
                             "model, which brings its own: pass one or the other")
        try:
            model = torch.load(args.input_path, weights_only=False)
        except Exception as error:  # whatever the file is, it is not a model this command can use
            raise UsageError(f"{args.input_path}: not a readable PyTorch file ({type(error).__name__}: "
                             f"{' '.join(str(error).split())[:200]})") from None
        if not isinstance(model, nn.Module):
            raise UsageError(f"{args.input_path}: --trust-pickle expects a pickled nn.Module; got "
                             f"{type(model).__name__}")
        return model, None
    try:
        state = load_checkpoint(args.input_path, verify=False)
    except PickledCheckpoint:
        raise UsageError(f"{args.input_path} holds pickled objects, which run code when loaded; pass --trust-pickle "
                         "only if you trust the file") from None
    except CheckpointError as error:
        raise UsageError(str(error)) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{args.input_path}: expected a state dict (names -> tensors); got {type(state).__name__}")
    if args.model is None:
        raise UsageError("a state dict needs --model (a registry name or package.module:factory) to know the "
                         "architecture; or pass a whole pickled model with --trust-pickle")
    model = build_model(args.model)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise UsageError(f"{args.input_path} does not fit --model {args.model}: {lines[min(1, len(lines) - 1)]}") \
            from None
    return model, args.model


def decompose_command(args) -> int:
    try:
        _check_paths(args)
        if args.budget_macs is not None and args.input is None:
            raise UsageError("--budget-macs needs --input (e.g. 1x3x224x224) to count mult-adds")
        if args.input is not None:
            check_memory(4 * math.prod(args.input), f"--input {'x'.join(map(str, args.input))}")
        model, spec = _load(args)
        example = torch.zeros(args.input) if args.input is not None else None
        try:
            converted, report = convert(model, kind=args.kind, energy=args.energy, rank=args.rank,
                                        max_error=args.max_error, budget_params=args.budget_params,
                                        budget_macs=args.budget_macs, include=args.include, exclude=args.exclude,
                                        example_input=example, inplace=True)
        except (TypeError, ValueError, RuntimeError) as error:
            raise UsageError(" ".join(str(error).split())) from None
    except UsageError as error:
        print(f"sepconv decompose: error: {error}", file=sys.stderr)
        return 2
    text = report.to_markdown()
    try:
        if spec is None:
            atomic_save(converted, args.output)
        else:
            ranks = {layer.name: layer.report.rank for layer in report.layers}
            save_checkpoint({"format": FORMAT, "model": spec, "kind": args.kind, "ranks": ranks,
                             "state_dict": converted.state_dict()}, args.output)
        if args.report is not None:
            atomic_write_text(f"# Decomposition of {args.input_path}\n\n{text}", args.report)
    except WriteError as error:
        print(f"sepconv decompose: error: {error}", file=sys.stderr)
        return 1
    print(text, end="")
    print(f"wrote {args.output}" + (f" and {args.report}" if args.report else ""))
    return 0


def add_parser(commands) -> None:
    parser = commands.add_parser("decompose", help="replace a model's convolutions by separable approximations",
                                 description=__doc__)
    parser.add_argument("input_path", metavar="IN.pt", help="state dict (with --model) or pickled model")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.pt")
    parser.add_argument("--model", help="architecture of a state dict: registry name or package.module:factory")
    parser.add_argument("--kind", choices=KINDS, default="depthwise_separable")
    rule = parser.add_mutually_exclusive_group()
    rule.add_argument("--energy", type=number_in(0, 1), help="per layer: smallest rank keeping this share of "
                      "sum(sigma^2), in (0, 1]")
    rule.add_argument("--rank", type=at_least(1, 2**31 - 1), help="per layer: this depth multiplier / number of mid "
                      "channels")
    rule.add_argument("--max-error", type=number_in(0, 1, low_open=False), help="per layer: relative Frobenius error "
                      "at most this, in [0, 1]")
    rule.add_argument("--budget-params", type=number_in(0, 1), help="global: fraction of the converted layers' "
                      "parameters, in (0, 1]")
    rule.add_argument("--budget-macs", type=number_in(0, 1), help="global: fraction of their mult-adds, in (0, 1] "
                      "(needs --input)")
    parser.add_argument("--input", type=parse_shape, help="input shape N x C x ... for MACs, e.g. 1x3x224x224")
    parser.add_argument("--include", action="append", help="only modules matching this fnmatch pattern (repeatable)")
    parser.add_argument("--exclude", action="append", help="leave modules matching this pattern alone (repeatable)")
    parser.add_argument("--report", metavar="REPORT.md", help="write the per-layer report as Markdown")
    parser.add_argument("--trust-pickle", action="store_true", help="allow IN.pt to be a pickled model (runs code)")
    parser.add_argument("--force", action="store_true", help="replace OUT.pt and REPORT.md if they exist (never IN.pt)")
    parser.set_defaults(handler=decompose_command)
