"""Compile the backend's launches for a GPU without one: what each kernel costs per thread.

Triton's own compiler builds a :class:`~butterfly.kernels.triton.bft.Launch` (the description the
launch code runs) for a target such as sm_90 (``GPUTarget("cuda", 90, 32)``), with the argument
specialisation a real launch gets (pointers and integers divisible by 16 marked so). From the PTX
it counts, per thread, the instructions that matter for these kernels: global loads of the tile
(``data``) and of the weights and epilogue parameters (``params``: the loads with an
``evict_last`` policy), their elements, shared-memory traffic, barriers and FMAs; ``ptxas -v``
(shipped with Triton) gives registers, spills and stack. Counts are static: a loop body (the
forward's blocks, the weight gradient's tiles) is counted once.

    python -m butterfly.kernels.triton.aot                     # the zoo and the extremes, sm_90
    python -m butterfly.kernels.triton.aot --arch 80 --json counts.json --limit 10

Production configurations come from :func:`zoo_layers` (every BFT layer of every registered
model at 224x224, with its feature-map size) and :data:`EXTREMES`; :func:`configurations` turns
them into deduplicated launches.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import timm
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ...models import registered_models
from ...nn import BFT
from ...plan import choose_radices
from .bft import DEFAULT_SMS, Launch, backward_launches, forward_launch, layer_of

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
               torch.float64: "fp64"}


def _param_names(kernel) -> List[Tuple[str, bool]]:
    return [(p.name, p.is_constexpr) for p in kernel.params]


def source_of(launch: Launch) -> ASTSource:
    """The launch as Triton's compiler input: the signature and constexprs a real launch of it
    specialises to (``None`` pointers are constexprs; pointers and integers that are multiples
    of 16 carry ``tt.divisibility``)."""
    constexprs = dict(launch.constexprs)
    signature, attrs, values = {}, {}, iter((*launch.pointers, *launch.ints))
    npointers = len(launch.pointers)
    for index, (name, is_constexpr) in enumerate(_param_names(launch.kernel)):
        if is_constexpr:
            signature[name] = "constexpr"
            continue
        value = next(values)
        if npointers > 0:
            npointers -= 1
            if value is None:
                signature[name], constexprs[name] = "constexpr", None
                continue
            signature[name] = "*" + DTYPE_NAMES[value]
            attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i64" if abs(value) >= 2 ** 31 else "i32"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)


def compile_launch(launch: Launch, arch: int = 90):
    """The launch compiled by Triton for ``sm_<arch>`` (a CompiledKernel with ``asm``)."""
    return triton.compile(source_of(launch), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": launch.num_warps})


_LOAD = re.compile(r"\b(ld|st)\.(global|shared)((?:\.[\w:]+)*)")


def _loop_lines(lines: List[str]) -> set:
    """Indices of the lines inside a loop: between a label and a later branch back to it."""
    labels = {}
    inside = set()
    for i, line in enumerate(lines):
        m = re.match(r"(\$\w+):", line)
        if m:
            labels[m.group(1)] = i
        m = re.search(r"\bbra(?:\.uni)?\s+(\$\w+);", line)
        if m and m.group(1) in labels:
            inside.update(range(labels[m.group(1)], i + 1))
    return inside


def ptx_counts(ptx: str) -> Dict[str, int]:
    """Per-thread static instruction counts of a kernel's PTX (see the module docstring); the
    ``*_loop`` counts are those inside a loop (per forward block, per weight-gradient tile)."""
    lines = [line.strip() for line in ptx[ptx.index(".entry"):].splitlines()]
    loop = _loop_lines(lines)
    keys = ("data_loads", "data_elems", "param_loads", "param_elems", "stores", "shared_loads",
            "shared_stores", "barriers", "fma")
    out = dict.fromkeys(keys + tuple(k + "_loop" for k in keys), 0)

    def add(key: str, i: int, n: int = 1) -> None:
        out[key] += n
        if i in loop:
            out[key + "_loop"] += n

    for i, line in enumerate(lines):
        if line.startswith(("//", ".loc")):
            continue
        m = _LOAD.search(line)
        if m:
            op, space, mods = m.groups()
            vec = re.search(r"\.v(\d)", mods)
            elems = int(vec.group(1)) if vec else 1
            if space == "shared":
                add("shared_loads" if op == "ld" else "shared_stores", i)
            elif op == "st":
                add("stores", i)
            elif "evict_last" in mods:
                add("param_loads", i)
                add("param_elems", i, elems)
            else:
                add("data_loads", i)
                add("data_elems", i, elems)
        elif re.match(r"(@!?%p\d+\s+)?(bar\.sync|barrier\.sync)", line):
            add("barriers", i)
        elif re.match(r"(@!?%p\d+\s+)?fma\.", line):
            add("fma", i)
    return out


def _ptxas() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


_USAGE_CACHE = os.path.join(os.environ.get("TRITON_CACHE_DIR") or
                            os.path.join(os.path.expanduser("~"), ".triton", "cache"),
                            "butterfly_ptxas_usage.json")


def ptxas_usage(ptx: str, arch: int) -> Dict[str, int]:
    """Registers, spill bytes and stack of the PTX, from ``ptxas -v`` (cached by the PTX)."""
    gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
    key = hashlib.sha256((gpu + ptx).encode()).hexdigest()
    try:
        with open(_USAGE_CACHE) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        run = subprocess.run([_ptxas(), "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", src,
                              "-o", os.path.join(tmp, "kernel.o")], capture_output=True,
                             text=True, check=True)
    log = run.stdout + run.stderr

    def number(pattern: str) -> int:
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    usage = dict(registers=number(r"Used (\d+) registers"),
                 spill_stores=number(r"(\d+) bytes spill stores"),
                 spill_loads=number(r"(\d+) bytes spill loads"),
                 stack=number(r"(\d+) bytes stack frame"))
    cache[key] = usage
    os.makedirs(os.path.dirname(_USAGE_CACHE), exist_ok=True)
    tmp_path = f"{_USAGE_CACHE}.{os.getpid()}"
    with open(tmp_path, "w") as f:
        json.dump(cache, f)
    os.replace(tmp_path, _USAGE_CACHE)
    return usage


@dataclass(frozen=True)
class Config:
    """A production launch: which layer and call it comes from, and the launch."""

    name: str    # e.g. "232->232 (4,4,4,4) nchw 14x14 bf16 fwd"
    launch: Launch

    def key(self) -> tuple:
        """What the compiled code depends on: two configurations with one key share a build."""
        ln = self.launch
        return (ln.kernel.fn.__name__ if hasattr(ln.kernel, "fn") else str(ln.kernel),
                ln.constexprs, ln.num_warps, ln.pointers,
                tuple(i % 16 == 0 for i in ln.ints), tuple(abs(i) >= 2 ** 31 for i in ln.ints))


def measure(config: Config, arch: int = 90) -> Dict[str, object]:
    """Compile ``config`` for ``sm_<arch>``: counts, registers, spills, shared memory."""
    start = time.perf_counter()
    kernel = compile_launch(config.launch, arch)
    ptx = kernel.asm["ptx"]
    row: Dict[str, object] = dict(name=config.name, arch=arch,
                                  kernel=config.launch.kernel.fn.__name__,
                                  warps=config.launch.num_warps,
                                  **dict(c for c in config.launch.constexprs
                                         if c[0] in ("BP", "LO", "HI", "ALIGN")))
    row.update(ptx_counts(ptx))
    row.update(ptxas_usage(ptx, arch))
    row["shared_bytes"] = kernel.metadata.shared
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


# -------------------------------------------------------------------- production configurations

@dataclass(frozen=True)
class LayerShape:
    in_channels: int
    out_channels: int
    radices: Tuple[int, ...]
    pixels: int   # H * W of the feature map the layer runs on
    label: str = ""


def zoo_layers(resolution: int = 224) -> List[LayerShape]:
    """Every BFT layer of every registered zoo model, with its feature-map size at
    ``resolution`` (deduplicated)."""
    seen: Dict[tuple, LayerShape] = {}
    for name in registered_models():
        model = timm.create_model(name).eval()
        shapes = {}

        def record(module, args, output):
            shapes.setdefault(module, args[0].shape)

        hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, BFT)]
        with torch.no_grad():
            model(torch.randn(1, 3, resolution, resolution))
        for hook in hooks:
            hook.remove()
        for module, shape in shapes.items():
            p = module.plan
            pixels = math.prod(shape[2:]) if len(shape) > 2 else 1
            key = (p.in_channels, p.out_channels, p.radices, pixels)
            seen.setdefault(key, LayerShape(*key, label=name))
    return sorted(seen.values(), key=lambda s: (s.in_channels, s.out_channels, s.pixels))


def _square(c: int, base: int, pixels: int, label: str) -> LayerShape:
    return LayerShape(c, c, choose_radices(c, base), pixels, label)


# The review's extremes: 64 to 2048 channels, radices 3, 5, 7 (padded), bases 2, 8, 16, expand
# and contract, 4096 padded channels, odd feature maps.
EXTREMES = [
    _square(64, 4, 3136, "64 base 4"), _square(2048, 4, 49, "2048 base 4"),
    _square(1024, 4, 49, "1024 base 4"), _square(512, 4, 196, "512 base 4"),
    _square(256, 2, 196, "256 base 2"), _square(512, 8, 196, "512 base 8"),
    _square(256, 16, 196, "256 base 16"), LayerShape(243, 243, (3,) * 5, 196, "radix 3"),
    LayerShape(125, 125, (5, 5, 5), 196, "radix 5"), LayerShape(343, 343, (7, 7, 7), 49, "radix 7"),
    LayerShape(3072, 3072, choose_radices(3072, 4), 49, "4096 padded"),
    LayerShape(128, 512, choose_radices(128, 4), 784, "expand"),
    LayerShape(512, 128, choose_radices(128, 4), 784, "contract"),
]


def configurations(layers: Sequence[LayerShape], batch: int = 32,
                   dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16),
                   layouts: Sequence[str] = ("nchw", "nhwc"),
                   passes: Sequence[str] = ("fwd", "fused", "bwd")) -> List[Config]:
    """The launches the library makes for ``layers`` at ``batch`` (each dtype, memory layout and
    pass: forward, fused forward with BatchNorm, activation and add, backward), one per distinct
    build."""
    out: Dict[tuple, Config] = {}
    for s in layers:
        layer = layer_of(s.in_channels, s.out_channels, tuple(s.radices))
        for layout in layouts:
            if layout == "nchw" and s.pixels > 1:
                shape = (batch, s.in_channels, s.pixels)
            elif layout == "nhwc" or s.pixels == 1:
                shape = (batch * s.pixels, s.in_channels, 1)
            else:
                continue
            for dtype in dtypes:
                name = (f"{s.in_channels}->{s.out_channels} {s.radices} {layout} P={s.pixels} "
                        f"{DTYPE_NAMES[dtype]}")
                launches = []
                if "fwd" in passes:
                    launches.append(("fwd", forward_launch(layer, shape, dtype, torch.float32,
                                                           False, True)))
                if "fused" in passes:
                    launches.append(("fused", forward_launch(
                        layer, shape, dtype, torch.float32, False, True,
                        (torch.float32, torch.float32, 3, True))))
                if "bwd" in passes:
                    bwd = backward_launches(layer, shape, dtype, torch.float32, True, DEFAULT_SMS)
                    if bwd.grad_input is not None:
                        launches.append(("dgrad", bwd.grad_input))
                    for launch in bwd.weight_grad:
                        lo, hi = dict(launch.constexprs)["LO"], dict(launch.constexprs)["HI"]
                        launches.append((f"wgrad[{lo}:{hi}]", launch))
                for kind, launch in launches:
                    config = Config(f"{name} {kind}", launch)
                    out.setdefault(config.key(), config)
    return list(out.values())


def format_table(rows: Sequence[Dict[str, object]]) -> str:
    cols = ["name", "warps", "BP", "ALIGN", "data_loads", "param_loads", "param_elems",
            "shared_loads", "barriers", "barriers_loop", "param_loads_loop", "fma", "registers",
            "spill_stores", "shared_bytes", "seconds"]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in rows:
        lines.append(" | ".join(str(r.get(c, "")) for c in cols))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m butterfly.kernels.triton.aot",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90, 80")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--no-zoo", action="store_true", help="the extremes only")
    parser.add_argument("--limit", type=int, default=0, help="compile at most this many")
    parser.add_argument("--match", default="", help="only configurations whose name contains it")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    layers = ([] if args.no_zoo else zoo_layers()) + EXTREMES
    configs = [c for c in configurations(layers, args.batch) if args.match in c.name]
    if args.limit:
        configs = configs[:args.limit]
    print(f"{len(configs)} distinct launches for sm_{args.arch}", file=sys.stderr)
    rows = []
    for config in configs:
        rows.append(measure(config, args.arch))
        print(format_table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
