"""``sepconv decompose``: turn a trained model's convolutions into separable ones, and save the result.

IN.pt is loaded safely (``torch.load(weights_only=True)``): a state dict, with ``--model`` naming the
architecture (a registry name or ``package.module:factory``). A whole pickled model runs code when loaded,
so it is accepted only with ``--trust-pickle``. The output is written atomically: a state-dict bundle
``{"format", "model", "kind", "ranks", "state_dict"}`` (reload it with ``sepconv.load_converted``), or a
pickled model when the input was one.
"""

from __future__ import annotations

import pickle
import sys

import torch
from torch import nn

from .._io import atomic_save, atomic_write_text
from ..conversion import KINDS, convert
from ._args import UsageError, build_model, parse_shape

FORMAT = "sepconv.converted/1"


def _load(args) -> tuple[nn.Module, str | None]:
    try:
        if args.trust_pickle:
            model = torch.load(args.input_path, weights_only=False)
            if not isinstance(model, nn.Module):
                raise UsageError(f"{args.input_path}: --trust-pickle expects a pickled nn.Module; got "
                                 f"{type(model).__name__}")
            return model, None
        state = torch.load(args.input_path, weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"{args.input_path}: no such file") from None
    except pickle.UnpicklingError:
        raise UsageError(f"{args.input_path} holds pickled objects, which run code when loaded; pass --trust-pickle "
                         "only if you trust the file") from None
    except (RuntimeError, EOFError) as error:
        raise UsageError(f"{args.input_path}: not a readable PyTorch file ({str(error).splitlines()[0]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{args.input_path}: expected a state dict (names -> tensors); got {type(state).__name__}")
    if args.model is None:
        raise UsageError("a state dict needs --model (a registry name or package.module:factory) to know the "
                         "architecture; or pass a whole pickled model with --trust-pickle")
    model = build_model(args.model)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise UsageError(f"{args.input_path} does not fit --model {args.model}: {str(error).splitlines()[1].strip()}") \
            from None
    return model, args.model


def decompose_command(args) -> int:
    try:
        model, spec = _load(args)
        example = torch.zeros(args.input) if args.input is not None else None
        if args.budget_macs is not None and example is None:
            raise UsageError("--budget-macs needs --input (e.g. 1x3x224x224) to count mult-adds")
        try:
            converted, report = convert(model, kind=args.kind, energy=args.energy, rank=args.rank,
                                        max_error=args.max_error, budget_params=args.budget_params,
                                        budget_macs=args.budget_macs, include=args.include, exclude=args.exclude,
                                        example_input=example, inplace=True)
        except (TypeError, ValueError, RuntimeError) as error:
            raise UsageError(str(error).splitlines()[0]) from None
    except UsageError as error:
        print(f"sepconv decompose: error: {error}", file=sys.stderr)
        return 2
    if spec is None:
        atomic_save(converted, args.output)
    else:
        ranks = {layer.name: layer.report.rank for layer in report.layers}
        atomic_save({"format": FORMAT, "model": spec, "kind": args.kind, "ranks": ranks,
                     "state_dict": converted.state_dict()}, args.output)
    text = report.to_markdown()
    if args.report is not None:
        atomic_write_text(f"# Decomposition of {args.input_path}\n\n{text}", args.report)
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
    rule.add_argument("--energy", type=float, help="per layer: smallest rank keeping this share of sum(sigma^2)")
    rule.add_argument("--rank", type=int, help="per layer: this depth multiplier / number of mid channels")
    rule.add_argument("--max-error", type=float, help="per layer: relative Frobenius error at most this")
    rule.add_argument("--budget-params", type=float, help="global: fraction of the converted layers' parameters")
    rule.add_argument("--budget-macs", type=float, help="global: fraction of their mult-adds (needs --input)")
    parser.add_argument("--input", type=parse_shape, help="input shape N x C x ... for MACs, e.g. 1x3x224x224")
    parser.add_argument("--include", action="append", help="only modules matching this fnmatch pattern (repeatable)")
    parser.add_argument("--exclude", action="append", help="leave modules matching this pattern alone (repeatable)")
    parser.add_argument("--report", metavar="REPORT.md", help="write the per-layer report as Markdown")
    parser.add_argument("--trust-pickle", action="store_true", help="allow IN.pt to be a pickled model (runs code)")
    parser.set_defaults(handler=decompose_command)
