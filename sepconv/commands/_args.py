"""Argument parsers shared by the sub-commands; they raise argparse errors (one line, exit code 2)."""

from __future__ import annotations

import argparse


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
