"""The fixed cost per call of the fused inference layers at batch 1: prepared layers against the
C++ operators called directly.

    python -m benchmarks.fixed_cost              # writes benchmarks/results/fixed_cost_cpu.{json,md}
    python -m benchmarks.fixed_cost --quick      # fewer rounds
    python -m benchmarks.fixed_cost --threads 1  # one table per thread count (default 2 1)

Every fused layer of :mod:`butterfly.passes.fuse` calls its prepared form (``csrc/bft/prepared.cpp``:
arguments checked once, called without the dispatcher). The other way to call the same kernels is
the C++ operator (``butterfly_cpu::forward_fused``, ``dw_forward``, ``dw_bft_fused``) with the
layer's arguments cached, through the dispatcher's boxed call, which parses and checks them on
every call: what the fused layers did before they were prepared. For each model of :data:`MODELS`
(channels_last, batch 1, fused by ``optimize_for_inference`` at the thread count timed), the
whole network is timed both ways by the harness, interleaved: *prepared* (as shipped) and
*operator* (a copy whose fused BFT, depthwise and depthwise -> BFT layers call their operators).
Both run the same kernels and give the same outputs (checked). A fused BFT layer alone (64
channels, 1x1 image: no arithmetic to speak of) shows the cost of one call each way.
"""
from __future__ import annotations

import copy
import sys
from typing import Callable, Dict, List, Tuple

import timm
import torch

import butterfly
from benchmarks import harness
from butterfly.ops.bft_fused import Epilogue, pixel_rows
from butterfly.passes.fuse import FusedBFT, FusedConv, FusedDepthwiseBFT

MODELS = ["mobilenetv1_bft_100@160", "mobilenetv1_bft_200@224", "shufflenetv2_bft_125@224",
          "mobilenetv3_small_bft_050@224"]
WAYS = ("prepared", "operator")
TINY = "one layer, 64 channels, 1x1"


def _bft_operator(layer: FusedBFT) -> Callable:
    """``layer`` as ``butterfly_cpu::forward_fused`` on the pixels of the image batch."""
    p = layer.plan
    args = (layer.weight.view(p.num_blocks, p.weights_per_block), list(p.radices),
            p.out_channels, layer.residual, layer.scale, layer.shift, layer.activation)

    def call(x, add=None):
        N, C, H, W = x.shape
        rows = pixel_rows(x)
        if rows is None:
            skip = None if add is None else add.reshape(N, p.out_channels, H * W).contiguous()
            y = torch.ops.butterfly_cpu.forward_fused(x.reshape(N, C, H * W).contiguous(), *args,
                                                      skip)
            return y.view(N, p.out_channels, H, W)
        skip = None if add is None else \
            add.permute(0, 2, 3, 1).reshape(N * H * W, p.out_channels, 1).contiguous()
        y = torch.ops.butterfly_cpu.forward_fused(rows, *args, skip)
        return y.view(N, H, W, p.out_channels).permute(0, 3, 1, 2)
    return call


def _depthwise_operator(layer: FusedConv) -> Callable:
    return lambda x: torch.ops.butterfly_cpu.dw_forward(x, layer.weight, layer.bias,
                                                        layer.stride[0], layer.activation)


class _DwBftOperators:
    """A depthwise -> BFT block through its operators, like the prepared block: called, in one
    pass (``dw_bft_fused``); ``apart``, the two layers' operators one after the other."""

    def __init__(self, block: FusedDepthwiseBFT):
        dw, pw = block.dw, block.pw
        p = pw.plan
        self.args = (dw.weight, dw.bias, dw.stride[0], dw.activation,
                     pw.weight.view(p.num_blocks, p.weights_per_block), list(p.radices),
                     p.out_channels, pw.residual, pw.scale, pw.shift, pw.activation)
        self.depthwise, self.bft = _depthwise_operator(dw), _bft_operator(pw)

    def __call__(self, x, add=None):
        return torch.ops.butterfly_cpu.dw_bft_fused(
            x, *self.args, None if add is None else add.contiguous(memory_format=torch.channels_last))

    def apart(self, x, add=None):
        return self.bft(self.depthwise(x), add)


_OPERATOR = {FusedBFT: _bft_operator, FusedConv: _depthwise_operator,
             FusedDepthwiseBFT: _DwBftOperators}


def use_operators(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (fused, called once) with every fused layer that has a prepared form calling its
    C++ operator instead, with its arguments cached."""
    for m in model.modules():
        if type(m) in _OPERATOR:
            call = _OPERATOR[type(m)](m)
            for key, value in m._prepared.items():
                if value is not None:
                    m._prepared[key] = call
    return model


def _steps(config: str) -> Tuple[Dict[str, Callable], int]:
    """The model's two ways as steps, and how many of its fused layers are prepared."""
    name, res = config.split("@")
    model = timm.create_model(name).eval()
    x = torch.randn(1, 3, int(res), int(res)).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fused, _ = butterfly.optimize_for_inference(model, x)
        want = fused(x)
        through_operators = copy.deepcopy(fused)   # its prepared forms are built afresh
        through_operators(x)
        use_operators(through_operators)
        got = through_operators(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    layers = sum(1 for m in fused.modules() if type(m) in _OPERATOR and
                 any(v is not None for v in m._prepared.values()))

    def run(model: torch.nn.Module) -> Callable:
        def step():
            with torch.no_grad():
                model(x)
        return step
    return {"prepared": run(fused), "operator": run(through_operators)}, layers


def _tiny_steps() -> Tuple[Dict[str, Callable], int]:
    layer = FusedBFT(butterfly.BFT(64, 64), Epilogue(torch.rand(64) + 0.5, torch.randn(64),
                                                     "relu"))
    x = torch.randn(1, 64, 1, 1)
    with torch.no_grad():
        layer(x)   # prepares it
        through_operator = copy.deepcopy(layer)
        through_operator(x)
        use_operators(through_operator)

    def run(module: torch.nn.Module) -> Callable:
        def step():
            with torch.no_grad():
                module(x)
        return step
    return {"prepared": run(layer), "operator": run(through_operator)}, 1


def report(data: Dict) -> List[str]:
    out = ["# Fixed cost per call: prepared fused layers against the C++ operators", "",
           "Batch 1, float32, channels_last; method: `benchmarks/fixed_cost.py`'s docstring. "
           "*prepared*: the fused layers as shipped; *operator*: the same kernels called through "
           "the operators with cached arguments (the fused layers before they were prepared).", "",
           *harness.runs_section(data)]
    cells = data["cells"]
    for threads in sorted({c["threads"] for c in cells.values()}, reverse=True):
        rows = []
        for config in [*MODELS, TINY]:
            c = {w: cells.get(f"t{threads}|{config}|{w}") for w in WAYS}
            if not all(v and v["status"] == "ok" for v in c.values()):
                continue
            unit, scale, digits = ("us", 1e3, 1) if config == TINY else ("ms", 1, 3)
            p, o = c["prepared"]["ms"] * scale, c["operator"]["ms"] * scale
            rows.append([config, *(f"{v:.{digits}f} {unit}" for v in (p, o, o - p)),
                         f"**{p / o:.2f}**", str(c["prepared"].get("layers", "-"))])
        out += [f"## {threads} thread{'s' * (threads > 1)}", "",
                *harness.table(["model", "prepared", "operator", "saved per call of the model",
                                "prepared / operator", "prepared layers"], rows, "lrrrrr"), ""]
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = harness.parser("fixed_cost", __doc__, threads=[2, 1])
    args = harness.checked(p, argv)
    store = harness.kernel_run("fixed_cost", "fixed_cost_cpu.json", argv, args)
    if store is None:
        return 1
    timing = harness.Timing(rounds=3 if args.quick else 8, calls=5 if args.quick else 20,
                            settle_s=0.05)
    for threads in args.threads:
        with harness.torch_threads(threads):
            configs = {config: _steps(config) for config in MODELS}
            configs[TINY] = _tiny_steps()
        for config, (steps, layers) in configs.items():
            harness.measure(store, {f"t{threads}|{config}|{way}":
                                    (lambda s=step, n=layers: (s, {"layers": n}))
                                    for way, step in steps.items()}, timing, threads)
        store.save()
    harness.write_report(args.out_dir / "fixed_cost_cpu.md", report(store.data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
