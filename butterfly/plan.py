"""How a BFT layer of any shape maps onto square butterflies.

A square butterfly of size ``n`` is a sequence of stages with radices ``(k_0, ..., k_{L-1})`` whose
product is ``n``. Stage ``s`` has stride ``t_s = n / (k_0 * ... * k_s)``; its group
``g = seg * t_s + r`` (``seg < k_0 * ... * k_{s-1}``, ``r < t_s``) mixes the channels
``seg * k_s * t_s + j * t_s + r`` for ``j < k_s`` with its own ``k_s x k_s`` block
(the paper's recursive definition, eq. 3 and 5, unrolled into stages and generalised to mixed
radices; this layout is public API).

A layer ``in_channels -> out_channels`` follows the paper's tiling rule with block size
``m = min(in_channels, out_channels)`` and ``T = ceil(max / m)`` blocks:

* expand (``in <= out``): every block sees the whole input; outputs are concatenated, truncated;
* contract (``in > out``): the zero-padded input is split into ``T`` chunks of ``m``; outputs summed.

Each block is a square butterfly of size ``n >= m``: ``n == m`` factored into mixed radices, or a
zero-padded larger size that factors better, whichever executes fewer multiply-adds, except that a
size filling whole vectors of ``VECTOR_CHANNELS`` channels is taken when it costs at most
``VECTOR_TOLERANCE`` times the cheapest. Odd radices come first: their stages then mix channels a
whole number of vectors apart, so that the CPU kernels run every stage with the channels as SIMD
lanes (``docs/kernel_cpu.md``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence, Tuple


def prime_factors(n: int) -> list[int]:
    factors, p = [], 2
    while p * p <= n:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    if n > 1:
        factors.append(n)
    return factors


def factor_radices(n: int, base: int) -> Tuple[int, ...]:
    """Radices for a butterfly of size ``n``: as many stages of ``base`` as divide ``n``, after the
    odd prime factors they leave (largest first) and before the twos they leave.
    ``factor_radices(64, 4) == (4, 4, 4)``, ``factor_radices(160, 4) == (5, 4, 4, 2)``,
    ``factor_radices(24, 4) == (3, 4, 2)``, ``factor_radices(1, k) == ()``."""
    stages = 0
    while n % base == 0 and n > 1:
        stages += 1
        n //= base
    rest = prime_factors(n) if n > 1 else []
    odd = sorted((p for p in rest if p % 2), reverse=True)
    return tuple(odd + [base] * stages + [p for p in rest if p == 2])


def butterfly_macs(radices: Tuple[int, ...]) -> int:
    """Multiply-adds per pixel of one square butterfly: ``n * sum(radices)``."""
    return math.prod(radices) * sum(radices)


VECTOR_CHANNELS = 16  # float32 lanes of an AVX-512 vector (two of AVX2's)
VECTOR_TOLERANCE = 1.1  # the multiply-adds a whole-vector size may cost over the cheapest


@lru_cache(maxsize=None)
def choose_radices(m: int, base: int) -> Tuple[int, ...]:
    """Radices covering ``m`` channels: of the sizes ``m <= n <=`` the next power of ``base``, the
    one with the fewest multiply-adds (ties go to the smaller size), unless it is not a multiple
    of ``VECTOR_CHANNELS`` and one that is costs at most ``VECTOR_TOLERANCE`` times as much."""
    if m < 1 or base < 2:
        raise ValueError(f"need m >= 1 and base >= 2, got m={m}, base={base}")
    limit = base ** math.ceil(math.log(m, base) - 1e-9) if m > 1 else 1
    cheapest = whole = None
    for n in range(m, max(limit, m) + 1):
        radices = factor_radices(n, base)
        cost = butterfly_macs(radices)
        if cheapest is None or cost < cheapest[0]:
            cheapest = (cost, radices)
        if n % VECTOR_CHANNELS == 0 and (whole is None or cost < whole[0]):
            whole = (cost, radices)
    if whole is not None and whole[0] <= VECTOR_TOLERANCE * cheapest[0]:
        return whole[1]
    return cheapest[1]


@dataclass(frozen=True)
class BFTPlan:
    """Static shape of a BFT layer: what the operator and the kernels need to know."""

    in_channels: int
    out_channels: int
    radices: Tuple[int, ...]

    @classmethod
    def of(cls, in_channels: int, out_channels: int, radices: Sequence[int]) -> "BFTPlan":
        """The plan of an operator call: ``radices`` as the operator takes them (a list)."""
        return cls(int(in_channels), int(out_channels), tuple(int(k) for k in radices))

    @property
    def block(self) -> int:
        """Logical size ``m`` of each square block."""
        return min(self.in_channels, self.out_channels)

    @property
    def size(self) -> int:
        """Size ``n`` of each square butterfly (``>= block``; larger means zero padding)."""
        return math.prod(self.radices)

    @property
    def num_blocks(self) -> int:
        return -(-max(self.in_channels, self.out_channels) // self.block)

    @property
    def expand(self) -> bool:
        return self.in_channels <= self.out_channels

    @property
    def weights_per_block(self) -> int:
        return butterfly_macs(self.radices)

    @property
    def macs_per_pixel(self) -> int:
        """Multiply-adds executed per pixel (every stage of every block)."""
        return self.num_blocks * self.weights_per_block

    def stage_offsets(self) -> list[int]:
        """Offset of each stage inside a block's flat weight vector."""
        offsets, acc = [], 0
        for k in self.radices:
            offsets.append(acc)
            acc += self.size * k
        return offsets


def make_plan(in_channels: int, out_channels: int, base: int) -> BFTPlan:
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("base", base)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if in_channels < 1 or out_channels < 1:
        raise ValueError(
            f"BFT needs at least one input and one output channel, got {in_channels} -> {out_channels}")
    if base < 2:
        raise ValueError(f"base must be an integer >= 2 (the paper uses 2 or 4), got {base}")
    m = min(in_channels, out_channels)
    return BFTPlan(in_channels, out_channels, choose_radices(m, base))
