"""``sepconv bench``: how fast a model runs each way -- PyTorch eager (NCHW, channels_last), torch.compile,
sepconv's kernels, sepconv.optimize_for_inference, ONNX Runtime, OpenVINO -- timed in rounds.

MODEL is a registered name (``sepconv.models``) or ``package.module:factory``, timed on a random input of the
--input shape; --suite runs a layer suite (depthwise, the default, or separable; a training step there also
computes the input's gradient) and --models the whole-model suite instead (--filter selects rows).

How it times: the PyTorch candidates share this process; each runtime candidate (onnxruntime, openvino at its
default precision -- bf16 on a CPU with AVX512-BF16 or AMX -- and openvino_f32) runs alone in its own process on
the model exported to ONNX, with its shipped settings (ORT's threads spin; --no-spin turns that off). After a
warm-up call and a calibration of calls per block (about 50 ms), each round gives the cores to one process at a
time, with a 100 ms pause between them so that the last one's idle threads stop spinning; in its turn a process
times one block of each of its candidates, and the order rotates every round. A time is the median over the rounds
(± its interquartile range): on a quiet machine medians repeat within a few percent; other work on the machine
widens the IQR. A runtime candidate whose package is missing is listed as skipped, with the extra to install; one
that fails or takes longer than --timeout for a step (loading and compiling included) is listed as failed.

The table goes to stdout: per row and candidate the precision, median ms ± IQR, speed-ups against the best eager
layout, torch.compile, ONNX Runtime and OpenVINO, the share of the machine's roofline and, below fp32, the error
against PyTorch's fp32 output and the top-1 agreement. --out DIR also writes results.json, table.txt and
speedup.png there. Ctrl-C keeps the rows finished so far and exits with 130.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
from pathlib import Path

from .._extras import MissingExtra, require
from .._io import WriteError, check_writable
from ._args import UsageError, at_least, build_model, check_memory, number_in, parse_shape

ROUNDS, QUICK_ROUNDS = 7, 3
BLOCK_S, QUICK_BLOCK_S = 0.05, 0.01  # seconds of calls per candidate per round
SUITE_CANDIDATES = ("eager_nchw", "eager_cl", "sepconv")
MAX_ROUNDS = 10_000


def _candidates(args) -> list[str]:
    from ..benchmark.runner import COMPILED, INFERENCE_ONLY, TRAINING_ONLY, WAYS, default_candidates
    from ..benchmark.runtimes import RUNTIMES

    known = [*WAYS, *RUNTIMES]  # the runtimes registered now

    if args.candidates is None:
        chosen = list(SUITE_CANDIDATES) if args.suite is not None else default_candidates(args.train)
    else:
        chosen = list(dict.fromkeys(name.strip() for name in args.candidates.split(",") if name.strip()))
        unknown = [name for name in chosen if name not in known]
        if unknown or not chosen:
            raise UsageError(f"--candidates {args.candidates!r}: unknown {', '.join(map(repr, unknown)) or 'none'}; "
                             f"choose from {', '.join(known)}")
        if args.train and (inference := [name for name in chosen if name in INFERENCE_ONLY or name in RUNTIMES]):
            raise UsageError(f"--candidates {', '.join(inference)} time inference only; leave out --train or them")
        if not args.train and (training := [name for name in chosen if name in TRAINING_ONLY]):
            raise UsageError(f"--candidates {', '.join(training)} times training only; add --train or leave it out")
    if args.no_compile:
        chosen = [name for name in chosen if name not in COMPILED]
        if not chosen:
            raise UsageError("--no-compile leaves no candidate of --candidates")
    return chosen


def _check_suite(suite: str | None) -> None:
    from ..benchmark.suite import LAYER_SUITES

    if suite is not None and suite not in LAYER_SUITES:
        raise UsageError(f"--suite {suite!r}: unknown suite; choose from {', '.join(LAYER_SUITES)}")


def _check_out(out: str | None, force: bool) -> Path | None:
    if out is None:
        return None
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out}: is a file, not a folder")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise UsageError(f"--out {out}: the folder exists and is not empty; pass --force to write into it "
                         "(results.json, table.txt and speedup.png are replaced)")
    try:
        check_writable(path, "--out")
    except ValueError as error:
        raise UsageError(f"cannot write {error}") from None
    return path


def _cases(args, quick: bool):
    """The rows, each a :class:`~sepconv.benchmark.Case`; for MODEL, after checking that it takes --input."""
    import torch

    from .. import kernels
    from ..benchmark import Case, layer_cases, model_cases, select

    if args.suite is not None or args.models:
        batches = (1,) if quick else (1, 32)
        precisions = ("fp32",) if args.train else ("fp32", "bf16")  # bf16 rows: inference (bf16 has no backward yet)
        cases = select(layer_cases(batches, args.suite, precisions) if args.suite is not None else model_cases(quick),
                       args.filter)
        if not cases:
            raise UsageError(f"--filter {args.filter!r} selects no row")
        return cases, "model suite" if args.models else f"{args.suite} layer suite"
    shape = args.input or (1, 3, 224, 224)
    check_memory(4 * math.prod(shape), f"--input {'x'.join(map(str, shape))}")
    torch.manual_seed(0)
    model = build_model(args.model)
    try:  # the model takes --input: checked before any timing
        with torch.no_grad(), kernels.use_kernels("reference"):
            model.eval()(torch.zeros(shape))
    except (ValueError, RuntimeError) as error:
        raise UsageError(f"MODEL {args.model!r} cannot run on --input {'x'.join(map(str, shape))}: "
                         f"{' '.join(str(error).split())}") from None
    return [Case(args.model, lambda: model, shape)], f"MODEL {args.model}"


def bench_command(args) -> int:
    try:
        sources = sum((args.model is not None, args.suite is not None, args.models))
        if sources != 1:
            raise UsageError("give one of MODEL, --suite or --models")
        _check_suite(args.suite)
        if args.filter is not None and args.model is not None:
            raise UsageError("--filter selects rows of --suite or --models; MODEL is one row")
        if args.input is not None and args.model is None:
            raise UsageError("--input is MODEL's input; the suites have their own shapes")
        candidates = _candidates(args)
        out = _check_out(args.out, args.force)
        tqdm = require("tqdm", "bench", "sepconv bench").tqdm
        if out is not None:
            require("matplotlib", "bench", "sepconv bench --out (the speed-up chart)")
        import torch

        if args.threads is not None:
            torch.set_num_threads(args.threads)
        cases, what = _cases(args, args.quick)
    except (UsageError, MissingExtra) as error:
        print(f"sepconv bench: error: {error}", file=sys.stderr)
        return 2

    from ..benchmark import report
    from ..benchmark.runner import TIMEOUT_S, run_case
    from ..profiling.timing import measure_machine

    threads = torch.get_num_threads()
    timeout_s = args.timeout or TIMEOUT_S
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else ROUNDS)
    machine = measure_machine()
    meta = {"what": what, "pass": "train" if args.train else "infer", "candidates": candidates, "threads": threads,
            "rounds": rounds, "block_s": QUICK_BLOCK_S if args.quick else BLOCK_S,
            "timeout_s": timeout_s, "ort_spinning": not args.no_spin, "torch": torch.__version__,
            "machine": str(machine), "copy_bandwidth_GBps": machine.memory_bandwidth / 1e9,
            "matmul_peak_GFLOPs": machine.peak_flops / 1e9, "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "argv": sys.argv[1:],
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "interrupted": False}
    results = []
    bar = tqdm(total=len(cases) * rounds, unit="round", file=sys.stderr, dynamic_ncols=True)
    try:
        for case in cases:
            bar.set_description(case.name)
            results.append(run_case(case, candidates, train=args.train, threads=threads, rounds=rounds,
                                    block_s=meta["block_s"], machine=machine, advance=lambda: bar.update(1),
                                    timeout_s=timeout_s, runtime_options={"spinning": not args.no_spin}))
    except KeyboardInterrupt:
        meta["interrupted"] = True
    finally:
        bar.close()
    table = report.format_table(results, meta)
    print(table, end="")
    if out is not None:
        try:
            written = report.write_outputs(out, results, meta, table)
        except (WriteError, MissingExtra) as error:
            print(f"sepconv bench: error: {error}", file=sys.stderr)
            return 1
        print(f"wrote {', '.join(str(path) for path in written)}", file=sys.stderr)
    return 130 if meta["interrupted"] else 0


def add_parser(commands) -> None:
    parser = commands.add_parser("bench", help="time a model (or a suite) across PyTorch, torch.compile, sepconv, "
                                 "ONNX Runtime and OpenVINO", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="MODEL", nargs="?",
                        help="registry name (e.g. mobilenet_v2) or package.module:factory")
    parser.add_argument("--suite", nargs="?", const="depthwise", metavar="NAME", help="a layer suite: depthwise "
                        "(the default; rows dw.<layer>.b<N>) or separable (rows sep.<layer>.b<N>)")
    parser.add_argument("--models", action="store_true", help="the whole-model suite (rows <model>.b<N>)")
    parser.add_argument("--filter", metavar="PATTERN", help="suite rows whose name matches (shell pattern, or a "
                        "substring)")
    parser.add_argument("--input", type=parse_shape, default=None,
                        help="MODEL's input shape N x C x spatial... (default 1x3x224x224)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--infer", dest="train", action="store_false",
                      help="time a forward pass in eval mode under torch.inference_mode (default)")
    mode.add_argument("--train", dest="train", action="store_true",
                      help="time a training step: forward, loss, backward, SGD step")
    parser.add_argument("--candidates", metavar="A,B,...", help="which to time (default: every one that applies "
                        "but sepconv_nchw, sepconv_cl, cpu_nchw and cpu_cl; --suite: eager_nchw,eager_cl,sepconv)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile candidates "
                        "(compiling takes seconds to minutes per row)")
    parser.add_argument("--threads", type=at_least(1, 4096), help="torch.set_num_threads and the runtimes' "
                        "threads (default: torch's current)")
    parser.add_argument("--timeout", type=number_in(0, 86_400), metavar="S",
                        help="a runtime candidate's limit per step, loading and compiling included (default 300, "
                        "sepconv.benchmark.runner.TIMEOUT_S); past it the candidate is reported as failed")
    parser.add_argument("--no-spin", action="store_true", help="turn off ONNX Runtime's spinning idle threads "
                        "(on by default, as ORT ships)")
    parser.add_argument("--rounds", type=at_least(1, MAX_ROUNDS), help=f"interleaved rounds per row (default "
                        f"{ROUNDS}, --quick {QUICK_ROUNDS})")
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds; the suites at batch 1 only")
    parser.add_argument("--out", metavar="DIR", help="also write results.json, table.txt and speedup.png here "
                        "(default: print only); a non-empty DIR only with --force")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out DIR")
    parser.set_defaults(handler=bench_command, train=False)
