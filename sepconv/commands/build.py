"""``sepconv build``: build (or find) the C++ kernels now, and say what they were built for.

Run it once at set-up (a Docker image, a CI cache, a cluster's shared home) so that no first call waits for the
compiler. ``--check`` builds nothing: it reports whether this process can load cached kernels (exit 0) or why
not (exit 1). The report (CPU features, compiler, cache path) is what a bug report needs.
"""

from __future__ import annotations

import platform
import sys


def facts(check: bool) -> tuple[list[str], str | None]:
    """The report's lines and why the kernels are not usable (None when they are); builds unless ``check``."""
    import torch

    from .. import __version__
    from ..kernels import cpu
    from ..kernels.cpu import build

    target = build.arch()  # a bad SEPCONV_ARCH is a usage error, raised before any work
    fields = build.record(cpu.KERNELS, target)
    reason = build.unusable_here(target)
    if reason is None and check:
        try:
            if build.load_built(cpu.KERNELS, fields) is None:
                reason = "not built yet for this CPU, these sources and flags: `sepconv build` builds them " \
                         "(usually 1-2 minutes)"
        except ImportError as error:
            reason = f"the cached build does not load: {error}"
    elif reason is None:
        reason = None if cpu.available() else cpu.failure()
    done = build.finished_build(fields)
    lines = [f"sepconv {__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
             f"{platform.system()} {platform.machine()}",
             "kernels: " + ("usable" if reason is None else f"not usable: {reason}"),
             f"arch: {target} ({build.flags(target)[1]}; SEPCONV_ARCH=native|portable)",
             f"CPU vector features: {' '.join(build.vector_flags(build.cpu_flags())) or 'none reported'}",
             f"compiler: {done['compiler'] if done else build.compiler_version()}",
             f"cache: {build.directory(fields)}" + (f" (built {done['built_at']} in {done['built_s']:.0f} s)"
                                                    if done else " (empty)")]
    return lines, reason


def build_command(args) -> int:
    try:
        lines, reason = facts(args.check)
    except ValueError as error:
        print(f"sepconv build: error: {error}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0 if reason is None else 1


def add_parser(commands) -> None:
    parser = commands.add_parser("build", help="build the C++ kernels now and report what they were built for",
                                 description=__doc__)
    parser.add_argument("--check", action="store_true",
                        help="build nothing: exit 0 if this process can load cached kernels, 1 (with the reason) "
                             "if not")
    parser.set_defaults(handler=build_command)
