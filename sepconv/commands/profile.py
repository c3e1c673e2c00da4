"""``sepconv profile``: what each layer of a model costs (params, MACs, bytes) and, with --measure, how long it takes.

MODEL is a registered name (``sepconv.models``, e.g. mobilenet_v1) or ``package.module:factory`` (called with
no arguments, it returns an ``nn.Module``). The model runs once on a random input of the --input shape
under a dispatch-level counter; --measure times every counted op and probes this machine's roofs;
--roofline writes the roofline plot (PNG, implies --measure).
"""

from __future__ import annotations

import math
import os
import sys

from .._io import check_writable
from ..profiling import plot_roofline, profile
from ._args import UsageError, at_least, build_model, check_memory, parse_shape

FORMATS = ("table", "csv", "json", "markdown")
MAX_RUNS = 10_000


def profile_command(args) -> int:
    measure = args.measure or args.roofline is not None
    replaces = args.roofline is not None and os.path.isfile(args.roofline)
    try:
        if args.roofline is not None:  # checked before the measurements, so that they are not lost
            if not args.roofline or os.path.isdir(args.roofline):
                raise UsageError(f"--roofline {args.roofline!r} must name a PNG file")
            try:
                check_writable(args.roofline, "--roofline")
            except ValueError as error:
                raise UsageError(f"cannot write {error}") from None
        check_memory(4 * math.prod(args.input), f"--input {'x'.join(map(str, args.input))}")
        model = build_model(args.model)
        try:
            result = profile(model, args.input, measure=measure, backward=args.backward, warmup=args.warmup,
                             repeats=args.repeats)
        except ValueError as error:
            raise UsageError(" ".join(str(error).split())) from None
        if args.roofline is not None:
            try:
                plot_roofline(result, args.roofline)
            except (OSError, ImportError) as error:
                raise UsageError(f"cannot write --roofline {args.roofline}: {error}") from None
    except UsageError as error:
        print(f"sepconv profile: error: {error}", file=sys.stderr)
        return 2
    text = {"table": str, "csv": type(result).to_csv, "json": type(result).to_json,
            "markdown": type(result).to_markdown}[args.format](result)
    print(text, end="" if text.endswith("\n") else "\n")
    if args.roofline is not None:
        print(f"wrote the roofline plot to {args.roofline}" + (" (it replaced the file there)" if replaces else ""),
              file=sys.stderr)  # stdout stays machine-readable
    return 0


def add_parser(commands) -> None:
    parser = commands.add_parser("profile", help="per-layer params, MACs, bytes, time and roofline of a model",
                                 description=__doc__)
    parser.add_argument("model", metavar="MODEL", help="registry name (e.g. mobilenet_v1) or package.module:factory")
    parser.add_argument("--input", type=parse_shape, default=(1, 3, 224, 224),
                        help="input shape N x C x spatial... (default 1x3x224x224)")
    parser.add_argument("--measure", action="store_true", help="time every counted op (median ± IQR) and probe "
                        "this machine's memory bandwidth and peak fp32")
    parser.add_argument("--backward", action="store_true", help="count (and time) the backward pass too")
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format (default table)")
    parser.add_argument("--roofline", metavar="PNG", help="write the roofline plot here (implies --measure)")
    parser.add_argument("--repeats", type=at_least(1, MAX_RUNS), default=5,
                        help="timed runs with --measure (default 5)")
    parser.add_argument("--warmup", type=at_least(0, MAX_RUNS), default=2, help="untimed runs first (default 2)")
    parser.set_defaults(handler=profile_command)
