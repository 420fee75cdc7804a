"""Every production launch of the Triton backend builds for sm_90 and sm_80, without a GPU.

The launches are the library's own (:func:`butterfly.kernels.triton.bft.forward_launch` and
``backward_launches``, what a call on a GPU runs) for the BFT layers of every zoo model and the
extremes of :data:`butterfly.kernels.triton.aot.EXTREMES`, built by Triton's compiler for a fake
target with the specialisation a real launch gets. Each must compile; a forward must not spill (beyond the few bytes ptxas may trade for occupancy,
see ``FORWARD_SPILL_BYTES``).
Registers, spills and shared memory of every build are written to ``aot_counts.json`` under the
test's tmp folder and printed as a table (``-s``).

The fast test builds a representative subset (small and 2048-channel forwards, padded radix,
expand, contract, the fused epilogue, a weight gradient, float64, sm_80); the exhaustive one
(every zoo layer, both layouts, float32 and bfloat16, forward, fused and backward) is slow.
"""
import json

import pytest
import torch

pytest.importorskip("triton")

from butterfly.kernels.triton import bft as triton_bft

if triton_bft.INTERPRETED:
    pytest.skip("builds need triton's compiler, not the interpreter", allow_module_level=True)

from butterfly.kernels.triton import aot
from butterfly.kernels.triton.aot import LayerShape
from butterfly.plan import choose_radices


def _build_all(configs, arch, tmp_path, name):
    rows, failures = [], []
    for config in configs:
        try:
            rows.append(aot.measure(config, arch))
        except Exception as error:  # collect every failure, then report them all
            failures.append(f"{config.name}: {type(error).__name__}: {str(error)[:300]}")
    (tmp_path / name).write_text(json.dumps(rows, indent=1))
    print(f"\nsm_{arch}:\n" + aot.format_table(rows))
    assert not failures, "\n".join(failures)
    spilling = [(r["name"], r["registers"], r["spill_stores"]) for r in rows
                if r["kernel"] == "bft_kernel" and r["spill_stores"] > FORWARD_SPILL_BYTES]
    assert not spilling, f"forward launches that spill registers: {spilling}"
    return rows


# A forward may spill a few bytes where ptxas keeps two 8-warp blocks per SM (128 registers)
# rather than one block without spills.
FORWARD_SPILL_BYTES = 16


FAST = [  # (layer, layout, dtype, passes)
    (LayerShape(64, 64, (4, 4, 4), 3136), "nchw", torch.float32, ("fwd", "bwd")),
    (LayerShape(232, 232, choose_radices(232, 4), 196), "nchw", torch.bfloat16, ("fwd",)),
    (LayerShape(2048, 2048, choose_radices(2048, 4), 49), "nhwc", torch.bfloat16, ("fwd",)),
    (LayerShape(128, 512, choose_radices(128, 4), 784), "nhwc", torch.float16, ("fused",)),
    (LayerShape(512, 128, choose_radices(128, 4), 784), "nchw", torch.float32, ("fwd",)),
    (LayerShape(24, 24, (4, 3, 2), 49), "nchw", torch.float64, ("fwd", "bwd")),
]


def _fast_configs():
    configs = []
    for layer, layout, dtype, passes in FAST:
        configs += aot.configurations([layer], 32, (dtype,), (layout,), passes)
    return configs


def test_representative_launches_build_for_sm90(tmp_path):
    rows = _build_all(_fast_configs(), 90, tmp_path, "aot_counts_sm90.json")
    by_name = {r["name"]: r for r in rows}
    # the weights of a stage arrive in one coalesced, vectorised load: no more load
    # instructions for them than for the tile itself, at 64 channels
    small = by_name["64->64 (4, 4, 4) nchw P=3136 fp32 fwd"]
    assert small["param_loads"] <= 2 * small["data_loads"], small
    # the weight-gradient loop has no reduction over the tile's pixels
    wgrad = by_name["64->64 (4, 4, 4) nchw P=3136 fp32 wgrad[0:3]"]
    assert wgrad["barriers_loop"] < 100, wgrad


def test_representative_launches_build_for_sm80(tmp_path):
    _build_all(_fast_configs()[:3], 80, tmp_path, "aot_counts_sm80.json")


def test_every_zoo_layer_has_launches():
    """The zoo's layers are all within the kernels' limits, and their launches are described
    without a GPU (the exhaustive build below compiles them)."""
    layers = aot.zoo_layers()
    assert len(layers) > 20
    for s in layers:
        assert not triton_bft._unsupported_radices(tuple(s.radices)), s
    assert len(aot.configurations(layers)) > len(layers)


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80])
def test_every_production_launch_builds(arch, tmp_path):
    """Every zoo layer and extreme, both layouts, float32 and bfloat16, forward, fused forward
    and backward, and the extremes in float16 and float64 forward (about 20 minutes)."""
    configs = aot.configurations(aot.zoo_layers() + aot.EXTREMES)
    configs += aot.configurations(aot.EXTREMES, 32, (torch.float16, torch.float64), ("nchw",),
                                  ("fwd",))
    _build_all(configs, arch, tmp_path, f"aot_counts_sm{arch}.json")
