"""GPU: the Triton BFT against cuDNN's 1x1 convolution.

    python -m benchmarks.kernel_gpu          # needs CUDA; writes benchmarks/results/kernel_gpu.{json,md}
    python -m benchmarks.kernel_gpu --quick  # four shapes, fewer repetitions

For every shape, dtype (float32, bfloat16) and memory format, the forward pass and forward +
backward of ``BFT`` (the "triton" backend, base 4) and of ``nn.Conv2d(in, out, 1, bias=False)``
are timed with ``triton.testing.do_bench`` (median; the L2 cache is flushed between calls, so
every call reads its operands from memory). Each cell records the time, the bytes the pass moves
at least (forward: input + output + weights; forward + backward adds the output gradient and the
input read, the input gradient written, the weights and their gradient) and so the BFT's share of
the device's peak memory bandwidth: what bounds a layer this narrow. Before timing, each
configuration's BFT output and gradients are checked against the reference backend.
:mod:`benchmarks.kernel` adds this section when CUDA is present.
"""
from __future__ import annotations

import sys
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from benchmarks import harness
from butterfly import BFT, use_backend

BATCH = 32
SHAPES = [(64, 64, 56), (128, 128, 28), (256, 256, 14), (512, 512, 14), (1024, 1024, 7),
          (116, 116, 28), (232, 232, 14), (464, 464, 7), (32, 64, 56), (512, 1024, 7)]
QUICK_SHAPES = [(128, 128, 28), (1024, 1024, 7), (232, 232, 14), (512, 1024, 7)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FORMATS = {"NCHW": torch.contiguous_format, "NHWC": torch.channels_last}
# Peak memory bandwidth (bytes/s) by device-name fragment, most specific first (vendor specs).
PEAK_BANDWIDTH = [
    ("GH200", 4.0e12), ("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12), ("H800", 3.35e12), ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12), ("A800", 2.039e12), ("L40S", 0.864e12),
    ("L40", 0.864e12), ("L4", 0.3e12), ("A10G", 0.6e12), ("A10", 0.6e12), ("V100", 0.9e12),
    ("T4", 0.32e12), ("RTX 4090", 1.008e12), ("RTX 3090", 0.936e12)]


def peak_bandwidth() -> Tuple[Optional[float], str]:
    """(bytes/s, where the figure comes from) for the current device."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    for fragment, peak in PEAK_BANDWIDTH:
        if fragment in props.name:
            return peak, f"spec sheet of {props.name}"
    clock, bus = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock and bus:  # kHz and bits, double data rate
        return 2 * clock * 1e3 * bus / 8, f"2 x memory clock x bus width of {props.name}"
    return None, f"unknown for {props.name}"


def check(layer: BFT, x: torch.Tensor) -> None:
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


def passes(layer: nn.Module, x: torch.Tensor):
    """(forward, forward + backward) of ``layer`` on ``x``."""
    params, xg, grad = list(layer.parameters()), x.detach().requires_grad_(), None
    with torch.no_grad():
        grad = torch.randn_like(layer(x))

    def forward():
        with torch.no_grad():
            layer(x)
    return forward, lambda: torch.autograd.grad(layer(xg), [xg, *params], grad)


def measure(store: harness.Store, quick: bool) -> None:
    """Time every configuration into ``store`` (cells keyed ``gpu|...``)."""
    from triton.testing import do_bench
    peak, source = peak_bandwidth()
    store.data["gpu"] = {"device": torch.cuda.get_device_name(), "peak_Bps": peak,
                         "peak_source": source, "rep_ms": 20 if quick else 100}
    for cin, cout, hw in QUICK_SHAPES if quick else SHAPES:
        for dt, dtype in DTYPES.items():
            for fmt, memory_format in FORMATS.items():
                torch.manual_seed(0)
                x = torch.randn(BATCH, cin, hw, hw, device="cuda", dtype=dtype).to(
                    memory_format=memory_format)
                bft = BFT(cin, cout, base=4).to(device="cuda", dtype=dtype)
                conv = nn.Conv2d(cin, cout, 1, bias=False).to(device="cuda", dtype=dtype,
                                                               memory_format=memory_format)
                fields = {"cin": cin, "cout": cout, "hw": hw, "dtype": dt, "format": fmt,
                          "radices": "x".join(map(str, bft.plan.radices))}
                with use_backend("triton"):
                    check(bft, x)
                    out = bft(x)
                    for name, layer in (("bft", bft), ("conv", conv)):
                        for pass_name, fn in zip(("fwd", "fwd+bwd"), passes(layer, x)):
                            ms = do_bench(fn, warmup=10, rep=store.data["gpu"]["rep_ms"],
                                          return_mode="median")
                            act, y = x.numel() * x.element_size(), out.numel() * out.element_size()
                            w = bft.weight.numel() * bft.weight.element_size()
                            moved = act + y + w + (y + 2 * act + 2 * w) * (pass_name != "fwd")
                            store.put(f"gpu|{cin}->{cout}@{hw}|{dt}|{fmt}|{pass_name}|{name}",
                                      {**fields, "pass": pass_name, "runner": name,
                                       "status": "ok", "ms": ms, "bytes": moved})
                print(f"   {cin}->{cout}@{hw} {dt} {fmt}", flush=True)


def section(data: Dict) -> List[str]:
    gpu, cells = data.get("gpu"), data["cells"]
    if not gpu:
        return []
    rows = []
    for k in dict.fromkeys(k.rsplit("|", 2)[0] for k in cells if k.startswith("gpu|")):
        c0 = cells[f"{k}|fwd|bft"]
        row = [f"{c0['cin']}->{c0['cout']} @{c0['hw']}", c0["radices"], c0["dtype"], c0["format"]]
        for pass_name in ("fwd", "fwd+bwd"):
            b, c = cells[f"{k}|{pass_name}|bft"], cells[f"{k}|{pass_name}|conv"]
            share = b["bytes"] / (b["ms"] * 1e-3) / gpu["peak_Bps"] if gpu["peak_Bps"] else None
            row += [f"{b['ms']:.3f}", f"{c['ms']:.3f}", f"{c['ms'] / b['ms']:.2f}",
                    harness.fmt(share, ".0%", "n/a")]
        rows.append(row)
    peak = gpu["peak_Bps"]
    return ["## GPU: Triton BFT vs cuDNN 1x1 convolution", "",
            f"Device: {gpu['device']}; peak memory bandwidth "
            + (f"{peak / 1e12:.2f} TB/s ({gpu['peak_source']})" if peak else gpu["peak_source"])
            + f". Batch {BATCH}, base 4; medians of `triton.testing.do_bench` (rep "
            f"{gpu['rep_ms']} ms, L2 flushed). %peak: the least bytes the pass moves / time / "
            "peak bandwidth; conv/bft > 1: BFT faster.", "",
            *harness.table(["layer", "radices", "dtype", "format", "fwd BFT ms", "fwd conv ms",
                            "fwd conv/bft", "fwd %peak", "fwd+bwd BFT ms", "fwd+bwd conv ms",
                            "fwd+bwd conv/bft", "fwd+bwd %peak"], rows, "llllrrrrrrrr"), ""]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = harness.checked(harness.parser("kernel_gpu", __doc__, threads=[1]), argv)
    if not torch.cuda.is_available():
        print("no CUDA device: the GPU benchmark needs one (nothing written)", file=sys.stderr)
        return 1
    store = harness.Store(args.out_dir / "kernel_gpu.json", "kernel_gpu", keep=False)
    store.start("kernel_gpu", argv, args.note)
    measure(store, args.quick)
    store.save()
    harness.write_report(args.out_dir / "kernel_gpu.md", [
        "# BFT kernel benchmark (GPU)", "", *harness.runs_section(store.data),
        *section(store.data)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
