"""What the sub-commands share: argument parsers, the one-line error convention, building MODEL."""

from __future__ import annotations

import argparse
import math

from .._io import machine_memory_bytes


def parse_shape(text: str, rank: int | None = None) -> tuple[int, ...]:
    """``"1x3x224x224"`` -> ``(1, 3, 224, 224)``; ``rank`` spatial dims if given (else 1 to 3)."""
    example = "1x3x224x224 (N x C x H x W)" if rank in (None, 2) else "x".join(["1", "3"] + ["32"] * rank)
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input must look like {example}; got {text!r}") from None
    ranks = (rank,) if rank is not None else (1, 2, 3)
    if len(shape) - 2 not in ranks or min(shape) < 1:
        sizes = " or ".join(str(r + 2) for r in ranks)
        raise argparse.ArgumentTypeError(f"--input must be {sizes} positive sizes like {example}; got {text!r}")
    return shape


class UsageError(ValueError):
    """A user error: the command prints its message as one line and exits with code 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``prog: error: message``) and exit code 2, without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_model(spec: str):
    """A model from a registry name (``sepconv.models``) or ``package.module:factory`` (called with no arguments).

    Every failure is a :class:`UsageError` naming MODEL: an unknown name (with the registered ones), an
    import that fails, a factory that raises, or one that returns something other than an ``nn.Module``.
    """
    import importlib

    from torch import nn

    from ..models import create_model, list_models

    if ":" in spec:
        module_name, _, factory_name = spec.partition(":")
        if not module_name or not factory_name:
            raise UsageError(f"MODEL {spec!r}: package.module:factory needs both a module and a factory name")
        try:
            factory = getattr(importlib.import_module(module_name), factory_name)
        except (ImportError, AttributeError, ValueError) as error:
            raise UsageError(f"MODEL {spec!r}: cannot import {factory_name!r} from {module_name!r} ({error})") from None
    else:
        def factory():
            try:
                return create_model(spec)
            except ValueError as error:
                raise UsageError(f"MODEL {spec!r}: {error}; MODEL must be a registered name "
                                 f"({', '.join(list_models())}) or package.module:factory") from None
    try:
        model = factory()
    except UsageError:
        raise
    except Exception as error:  # the factory's own failure, on one line
        raise UsageError(f"MODEL {spec!r}: building it failed with {type(error).__name__}: "
                         f"{' '.join(str(error).split())}") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"MODEL {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def at_least(minimum: int, maximum: int | None = None):
    """An argparse type: an int >= ``minimum`` (and <= ``maximum`` if given)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum or maximum is not None and value > maximum:
            bounds = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
            raise argparse.ArgumentTypeError(f"must be an int {bounds}; got {text!r}")
        return value
    return parse


def number_in(low: float, high: float, *, low_open: bool = True):
    """An argparse type: a finite float in ``(low, high]`` (``[low, high]`` if not ``low_open``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (low < value <= high if low_open else low <= value <= high):
            bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"must be a number in {bounds}; got {text!r}")
        return value
    return parse


def check_memory(needed_bytes: int, what: str) -> None:
    """:class:`UsageError` when ``what`` needs more than this machine's memory (``needed_bytes``: a lower bound,
    e.g. the cost model's input + output + weights), before anything is allocated."""
    available = machine_memory_bytes()
    if needed_bytes > available:
        raise UsageError(f"{what} needs at least {needed_bytes / 2**30:,.1f} GiB of memory (float32); this machine "
                         f"has {available / 2**30:,.1f} GiB")
