"""``sepconv example``: a worked cost example — one standard convolution vs its depthwise separable replacement."""

from __future__ import annotations

import argparse
import sys

import torch

from .. import geometry
from ..cost import conv_cost, conv_mult_adds, separable_cost
from ..layers import Conv2d, SeparableConv2d
from ._args import at_least, check_memory, parse_shape

MAX_SIZE = 2**31 - 1  # channels, kernel sizes, strides and padding: what PyTorch's convolutions index with int32


def parse_padding(text: str):
    if text in geometry.PADDING_STRINGS:
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_SIZE:
        raise argparse.ArgumentTypeError(f"must be same, valid, causal or an int from 0 to {MAX_SIZE}; "
                                         f"got {text!r}")
    return value


def _median_ms(module: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Median forward time and its interquartile range, in ms, from torch.utils.benchmark."""
    from torch.utils import benchmark
    with torch.inference_mode():
        measurement = benchmark.Timer("m(x)", globals={"m": module, "x": x}).blocked_autorange(min_run_time=0.5)
    return measurement.median * 1e3, measurement.iqr * 1e3


def example(args) -> int:
    n, c, h, w = args.input
    try:
        # the costs check the geometry and bound the memory (input, outputs and weights) before anything is made
        costs = [cost(args.input, args.out_channels, args.kernel_size, args.stride, args.padding, bias=True, **extra)
                 for cost, extra in ((conv_cost, {}), (separable_cost, {"depth_multiplier": args.depth_multiplier}))]
        check_memory(sum(cost.bytes for cost in costs) - 4 * n * c * h * w,
                     f"--input {n}x{c}x{h}x{w} with --out-channels {args.out_channels}")
        standard = Conv2d(c, args.out_channels, args.kernel_size, args.stride, args.padding, bias=True)
        separable = SeparableConv2d(c, args.out_channels, args.kernel_size, args.stride, args.padding,
                                    depth_multiplier=args.depth_multiplier, bias=True)
        x = torch.randn(n, c, h, w)
        with torch.no_grad():
            y_standard = standard(x)
            hidden = separable.depthwise_weight.shape[0]
            y = separable(x)
    except (TypeError, ValueError) as error:
        print(f"sepconv example: error: {error}", file=sys.stderr)
        return 2
    k = standard.kernel_size
    rows = [
        ("standard conv", f"{k[0]}x{k[1]}, {c}->{args.out_channels}", standard.weight.numel(), standard.bias.numel(),
         conv_mult_adds(standard.weight.shape, y_standard.shape), standard),
        ("  depthwise step", f"{k[0]}x{k[1]}, {c}->{hidden}", separable.depthwise_weight.numel(), 0,
         conv_mult_adds(separable.depthwise_weight.shape, (n, hidden, *y.shape[2:])), None),
        ("  pointwise step", f"1x1, {hidden}->{args.out_channels}", separable.pointwise_weight.numel(),
         separable.bias.numel(), conv_mult_adds(separable.pointwise_weight.shape, y.shape), None),
    ]
    separable_row = ("separable conv", "depthwise + pointwise", sum(r[2] for r in rows[1:]), separable.bias.numel(),
                     sum(r[4] for r in rows[1:]), separable)
    rows.append(separable_row)

    print(f"Worked example: one convolution layer on an input of {n}x{c}x{h}x{w} (N x C x H x W), "
          f"stride {args.stride}, padding {args.padding!r} -> output {tuple(y.shape)}")
    print("Mult-adds (MACs) count one multiply-add per weight per output position; FLOPs = 2 x MACs.\n")
    header = f"{'layer':<17} {'shape':<22} {'weights':>10} {'biases':>7} {'MACs':>14} {'FLOPs':>14}"
    if args.measure:
        header += f" {'forward ms (median ± IQR)':>27}"
    print(header)
    print("-" * len(header))
    timings = {}
    for name, shape, weights, biases, macs, module in rows:
        line = f"{name:<17} {shape:<22} {weights:>10,} {biases:>7,} {macs:>14,} {2 * macs:>14,}"
        if args.measure and module is not None:
            median, iqr = _median_ms(module, x)
            timings[name] = median
            line += f" {median:>16.3f} ± {iqr:.3f}"
        print(line)

    macs_ratio = separable_row[4] / rows[0][4]
    params_ratio = (separable_row[2] + separable_row[3]) / (rows[0][2] + rows[0][3])
    kernel_area = k[0] * k[1]
    closed_form = args.depth_multiplier / args.out_channels + args.depth_multiplier / kernel_area
    print(f"\nseparable / standard: params {params_ratio:.4f} ({1 / params_ratio:.2f}x fewer), "
          f"MACs {macs_ratio:.4f} ({1 / macs_ratio:.2f}x fewer)")
    print(f"closed form M/C_out + M/K^2 = {args.depth_multiplier}/{args.out_channels} + "
          f"{args.depth_multiplier}/{kernel_area} = {closed_form:.4f}")
    if args.measure:
        speedup = timings["standard conv"] / timings["separable conv"]
        print(f"measured forward speed-up: {speedup:.2f}x (theoretical from MACs: {1 / macs_ratio:.2f}x) — "
              "the depthwise step is memory-bound, so fewer MACs is not proportionally faster")
    return 0


def add_parser(commands) -> None:
    parser = commands.add_parser("example", help="worked cost example: a standard conv vs its separable replacement",
                                 description=__doc__)
    parser.add_argument("--input", type=lambda text: parse_shape(text, rank=2), default=(1, 3, 224, 224),
                        help="N x C x H x W (default 1x3x224x224)")
    parser.add_argument("--out-channels", type=at_least(1, MAX_SIZE), default=64)
    parser.add_argument("--kernel-size", type=at_least(1, MAX_SIZE), default=3)
    parser.add_argument("--stride", type=at_least(1, MAX_SIZE), default=1)
    parser.add_argument("--padding", type=parse_padding, default="same")
    parser.add_argument("--depth-multiplier", type=at_least(1, MAX_SIZE), default=1)
    parser.add_argument("--no-measure", dest="measure", action="store_false", help="skip the timing")
    parser.set_defaults(handler=example)
