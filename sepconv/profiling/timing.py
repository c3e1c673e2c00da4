"""Timing statistics and the machine probes a roofline is drawn with.

:func:`measure_machine` measures the two roofs of this machine with small probes: memory bandwidth
(a copy larger than the last-level cache, counting the bytes read plus the bytes written) and peak
fp32 throughput (a square matrix product, ``2 n^3`` FLOPs). Each probe is run a few times after a
warm-up and the best run is kept: a roof is what the machine can reach, not what it usually does.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .._timer import samples
from .counter import synchronize

__all__ = ["Machine", "measure_machine", "median_and_iqr"]


def median_and_iqr(samples: Sequence[float]) -> tuple[float, float]:
    """Median and interquartile range (0 for a single sample)."""
    if len(samples) < 2:
        return samples[0], 0.0
    first, median, third = statistics.quantiles(samples, n=4, method="inclusive")
    return median, third - first


@dataclass(frozen=True)
class Machine:
    """The roofs of one machine.

    Attributes:
        memory_bandwidth: bytes per second, reads plus writes, of a large copy.
        peak_flops: fp32 FLOPs per second of a large matrix product.
        threads: the intra-op threads PyTorch used.
        description: how the figures were measured.
    """

    memory_bandwidth: float
    peak_flops: float
    threads: int
    description: str = ""

    @property
    def ridge_intensity(self) -> float:
        """FLOP/byte above which the peak, not memory, bounds a layer."""
        return self.peak_flops / self.memory_bandwidth

    def predicted_seconds(self, flops: float, moved_bytes: float) -> float:
        """Roofline time: the larger of the compute time at peak and the memory time at full bandwidth."""
        return max(flops / self.peak_flops, moved_bytes / self.memory_bandwidth)

    def __str__(self) -> str:
        return (f"memory bandwidth {self.memory_bandwidth / 1e9:.1f} GB/s, peak fp32 {self.peak_flops / 1e9:.1f} "
                f"GFLOP/s, ridge {self.ridge_intensity:.1f} FLOP/byte, {self.threads} threads ({self.description})")


def measure_machine(copy_mib: int = 64, matmul_size: int = 1024, repeats: int = 8,
                    device: torch.device | str = "cpu") -> Machine:
    """Probe memory bandwidth (a ``copy_mib`` MiB copy) and peak fp32 (an ``n x n`` matrix product).

    64 MiB exceeds the last-level caches of most CPUs (32 MiB on the 2-core CPU this was written on).
    """
    source = torch.ones(copy_mib * 2**20 // 4, device=device)
    target = torch.empty_like(source)

    def copy():
        target.copy_(source)
        synchronize([target])

    copy_seconds = min(samples(copy, repeats, warmup=2))
    left, right = torch.randn(matmul_size, matmul_size, device=device), torch.randn(matmul_size, matmul_size,
                                                                                    device=device)
    product = torch.empty_like(left)

    def multiply():
        torch.mm(left, right, out=product)
        synchronize([product])

    multiply_seconds = min(samples(multiply, repeats, warmup=2))
    description = (f"best of {repeats}: copy of {copy_mib} MiB counting read + write; "
                   f"{matmul_size}x{matmul_size} fp32 matmul, 2n^3 FLOPs")
    return Machine(2 * source.nbytes / copy_seconds, 2 * matmul_size**3 / multiply_seconds, torch.get_num_threads(),
                   description)
