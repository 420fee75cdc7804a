"""GPU section of the kernel benchmark: the Triton BFT against cuDNN's 1x1 convolution.

    python -m benchmarks.kernel_gpu          # needs CUDA; writes benchmarks/results/kernel_gpu.md
    python -m benchmarks.kernel_gpu --quick  # fewer shapes and repetitions

``benchmarks/kernel.py`` calls :func:`run_gpu_section` when CUDA is present. For every shape, dtype
(float32, bfloat16) and memory format it times the forward pass and forward+backward of ``BFT``
(the "triton" backend) and of ``nn.Conv2d(in, out, 1, bias=False)`` (cuDNN) with
``triton.testing.do_bench`` (median, L2 flushed between runs), and reports:

* ``ms``: median time;
* ``%peak``: achieved bandwidth as a fraction of the device's peak memory bandwidth, counting the
  bytes the pass must move at least: forward = input + output + weights; forward+backward adds the
  backward's output grad + input (read) + input grad (written) + weights + weight grad;
* ``conv/bft``: the conv's time over the BFT's (> 1: BFT is faster).

Before timing, each configuration's BFT output and gradients are checked against the reference.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

import butterfly
from butterfly import BFT, use_backend

# (in, out, H = W) at batch 32: square widths of MobileNet-like stages, ShuffleNetV2's
# 116/232/464 stages, and two in != out layers (MobileNetV1's 32 -> 64 and 512 -> 1024).
SHAPES: List[Tuple[int, int, int]] = [
    (64, 64, 56), (128, 128, 28), (256, 256, 14), (512, 512, 14), (1024, 1024, 7),
    (116, 116, 28), (232, 232, 14), (464, 464, 7),
    (32, 64, 56), (512, 1024, 7),
]
QUICK_SHAPES = [(128, 128, 28), (1024, 1024, 7), (232, 232, 14), (512, 1024, 7)]
BATCH = 32

# Peak memory bandwidth (bytes/s) by device-name fragment, most specific first (vendor specs).
PEAK_BANDWIDTH = [
    ("GH200", 4.0e12), ("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12), ("H800", 3.35e12), ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12), ("A800", 2.039e12), ("L40S", 0.864e12),
    ("L40", 0.864e12), ("L4", 0.3e12), ("A10G", 0.6e12), ("A10", 0.6e12), ("V100", 0.9e12),
    ("T4", 0.32e12), ("RTX 4090", 1.008e12), ("RTX 3090", 0.936e12),
]


def peak_bandwidth(device: torch.device) -> Tuple[Optional[float], str]:
    """(bytes/s, where the figure comes from) for ``device``."""
    props = torch.cuda.get_device_properties(device)
    for fragment, peak in PEAK_BANDWIDTH:
        if fragment in props.name:
            return peak, f"spec sheet of {props.name}"
    clock = getattr(props, "memory_clock_rate", 0)  # kHz
    bus = getattr(props, "memory_bus_width", 0)      # bits
    if clock and bus:  # double data rate
        return 2 * clock * 1e3 * bus / 8, f"2 x memory clock x bus width of {props.name}"
    return None, f"unknown for {props.name}"


def _bytes(x: torch.Tensor, y: torch.Tensor, params: int, backward: bool) -> int:
    """Bytes a pass moves at least (see the module docstring)."""
    act, out, w = x.numel() * x.element_size(), y.numel() * y.element_size(), params
    forward = act + out + w
    return forward + (out + act + act + 2 * w) if backward else forward


def _check(layer: BFT, x: torch.Tensor) -> None:
    """The triton backend agrees with the reference on this configuration."""
    x = x.detach().requires_grad_()
    results = []
    for backend in ("triton", "reference"):
        with use_backend(backend):
            y = layer(x)
            results.append((y, *torch.autograd.grad(y.float().square().sum(), (x, layer.weight))))
    tol = 1e-3 if x.dtype == torch.float32 else 3e-2
    for got, want in zip(*results):
        err = (got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1)
        if err > tol:
            raise AssertionError(f"triton BFT differs from the reference: relative error {err:.1e}")


def _timers(layer: nn.Module, x: torch.Tensor) -> Tuple[Callable, Callable]:
    params = [p for p in layer.parameters()]
    xg = x.detach().requires_grad_()
    grad = torch.randn_like(layer(x))

    def forward():
        with torch.no_grad():
            layer(x)

    def forward_backward():
        torch.autograd.grad(layer(xg), [xg, *params], grad)

    return forward, forward_backward


def _measure(cin: int, cout: int, hw: int, dtype: torch.dtype, memory_format, rep: int,
             peak: Optional[float], device: torch.device) -> str:
    """One table row."""
    from triton.testing import do_bench

    torch.manual_seed(0)
    x = torch.randn(BATCH, cin, hw, hw, device=device, dtype=dtype).to(memory_format=memory_format)
    bft = BFT(cin, cout, base=4).to(device=device, dtype=dtype)
    conv = nn.Conv2d(cin, cout, 1, bias=False).to(device=device, dtype=dtype,
                                                   memory_format=memory_format)
    with use_backend("triton"):
        _check(bft, x)
        y = bft(x)
        bft_times = [do_bench(fn, warmup=10, rep=rep, return_mode="median")
                     for fn in _timers(bft, x)]
    conv_times = [do_bench(fn, warmup=10, rep=rep, return_mode="median") for fn in _timers(conv, x)]
    weight_bytes = bft.weight.numel() * bft.weight.element_size()
    cells = []
    for backward, (b_ms, c_ms) in enumerate(zip(bft_times, conv_times)):
        moved = _bytes(x, y, weight_bytes, bool(backward))
        frac = f"{moved / (b_ms * 1e-3) / peak:.0%}" if peak else "n/a"
        cells += [f"{b_ms:.3f}", f"{c_ms:.3f}", f"{c_ms / b_ms:.2f}", frac]
    fmt = "NHWC" if memory_format == torch.channels_last else "NCHW"
    dt = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    radices = "x".join(map(str, bft.plan.radices))
    return f"| {cin}->{cout} @{hw} | {radices} | {dt} | {fmt} | " + " | ".join(cells) + " |"


def run_gpu_section(args) -> str:
    """Markdown of the GPU comparison (``args``: ``quick`` (bool), optional ``shapes``, a list of
    ``(in, out, H)``). Call only when ``torch.cuda.is_available()``."""
    quick = getattr(args, "quick", False)
    shapes = getattr(args, "shapes", None) or (QUICK_SHAPES if quick else SHAPES)
    rep = 20 if quick else 100
    device = torch.device("cuda")
    peak, source = peak_bandwidth(device)
    props = torch.cuda.get_device_properties(device)
    lines = [
        "## GPU: Triton BFT vs cuDNN 1x1 convolution",
        "",
        f"Device: {props.name} ({props.multi_processor_count} SMs); peak memory bandwidth "
        + (f"{peak / 1e12:.2f} TB/s ({source})." if peak else f"{source}.")
        + f" torch {torch.__version__}, triton {__import__('triton').__version__},"
        f" butterfly {butterfly.__version__}. Batch {BATCH}, base 4, residual on; medians of"
        f" `triton.testing.do_bench` (rep={rep} ms, L2 flushed).",
        "",
        "| layer | radices | dtype | format | fwd BFT ms | fwd conv ms | fwd conv/bft | "
        "fwd %peak | fwd+bwd BFT ms | fwd+bwd conv ms | fwd+bwd conv/bft | fwd+bwd %peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cin, cout, hw in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            for memory_format in (torch.contiguous_format, torch.channels_last):
                lines.append(_measure(cin, cout, hw, dtype, memory_format, rep, peak, device))
                print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 shapes, fewer repetitions")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "kernel_gpu.md")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: the GPU benchmark needs one (nothing written)", file=sys.stderr)
        return 1
    text = "# BFT kernel benchmark (GPU)\n\nProduced by `python -m benchmarks.kernel_gpu" \
        + (" --quick" if args.quick else "") + "`.\n\n" + run_gpu_section(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
