"""The ``sepconv`` command line: one sub-command per module in :mod:`sepconv.commands`.

``sepconv`` with no sub-command runs ``sepconv compare``: a network and its separable twin trained and
compared on scikit-learn's bundled digits.
"""

from __future__ import annotations

import sys

from . import kernels
from .commands import bench, build, compare, decompose, example, profile
from .commands._args import OneLineParser
from .kernels.cpu import build as kernels_build

COMMANDS = {"compare": compare, "example": example, "decompose": decompose, "profile": profile,
            "bench": bench, "build": build}
DEFAULT_COMMAND = "compare"


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="sepconv", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", parser_class=OneLineParser)
    for module in COMMANDS.values():
        module.add_parser(commands)
    return parser


def _version() -> str:
    import platform

    import torch

    from . import __version__
    return f"sepconv {__version__} (torch {torch.__version__}, Python {platform.python_version()})"


def main(argv=None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:  # compare takes no positional word
        parser.error(f"unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)} (none runs "
                     f"{DEFAULT_COMMAND})")
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version")):
        argv = [DEFAULT_COMMAND, *argv]
    args = parser.parse_args(argv)
    try:  # the environment's kernels mode and arch, checked before any work rather than at the first convolution
        kernels.get_kernels()
        kernels_build.arch()
    except ValueError as error:
        parser.error(str(error))
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
