"""``python -m benchmarks.training``: a quick run of the smallest pair (cells, a failing path,
the split, the bounds), the cache, the grouping of pairs, and the attribution of profiler events."""
import json
import math

import pytest
import torch
from torch import nn

import butterfly
from benchmarks import harness
from benchmarks import training as T
from butterfly.nn.depthwise import DepthwiseConv2d
from butterfly.ops.depthwise import kernel_available

PAIR = "fmnist-mobilenetv3"  # the smallest pair: under 1 MMAC per image


def _cells(pair, paths, threads=1, batch=T.BATCH):
    return [T.cell_key(c, p, threads, batch) for c in T.pair_configs(T.PAIRS[pair]) for p in paths]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One quick run: eager, eager_cl and a compile path that fails on purpose."""
    out = tmp_path_factory.mktemp("training")

    def broken(*args, **kwargs):
        raise RuntimeError("compiler unavailable\nsecond line")

    mp = pytest.MonkeyPatch()
    mp.setitem(T.PREPARE, "compile", broken)
    threads = torch.get_num_threads()
    try:
        assert T.main(["--quick", "--pairs", PAIR, "--paths", "eager", "eager_cl", "compile",
                       "--threads", "1", "--out-dir", str(out), "--note", "test"]) == 0
    finally:
        mp.undo()
        torch.set_num_threads(threads)
    return out, json.loads((out / T.JSON_NAME).read_text())


@pytest.mark.slow
def test_quick_run_cells(quick_run):
    out, data = quick_run
    for key in _cells(PAIR, ["eager", "eager_cl"]):
        cell = data["cells"][key]
        assert cell["status"] == "ok", cell
        assert cell["quick"] and cell["samples"] == 2 * 3 and cell["threads"] == 1
        assert cell["img_s"] == pytest.approx(T.BATCH * 1e3 / cell["ms"])
        assert cell["warmup_steps"] == 1 and cell["load_before"] is not None
    for key in _cells(PAIR, ["compile"]):
        assert data["cells"][key]["status"] == "failed"
        assert data["cells"][key]["reason"] == "RuntimeError: compiler unavailable"
    for config in T.pair_configs(T.PAIRS[PAIR]):
        meta = data["configs"][config]
        assert meta["macs"] > 0 and meta["act_bytes_layers"] > 0 and meta["weight_bytes"] > 0
    assert data["runs"][0]["note"] == "test" and data["runs"][0]["machine"]["flags"]
    rates = data["rates"]["t1"]
    assert rates["quick"] and all(rates[k] > 0 for k in ("fma_GMACs", "copy_GBs", "bft_GMACs"))
    md = (out / T.MD_NAME).read_text()
    assert "## 1 thread, batch 32" in md and "### What bounds it" in md


@pytest.mark.slow
def test_quick_run_split(quick_run):
    _, data = quick_run
    nchw = _cells(PAIR, ["eager"])
    assert set(nchw) <= set(data["splits"])
    for split in data["splits"].values():
        assert split["status"] == "ok", split
        assert sum(split["share"].values()) == pytest.approx(100.0, abs=0.01)
        assert split["profiled_step_ms"] > 0
    bft, base = data["splits"][nchw[0]], data["splits"][nchw[1]]
    assert bft["config"].split("/")[1].startswith("mobilenetv3_small_bft")
    assert bft["share"]["bft"] >= bft["butterfly_ops_share"] > 0 and bft["share"]["depthwise"] > 0
    assert base["share"]["bft"] == 0 and base["share"]["pointwise"] > 0


def test_plan_uses_the_store(tmp_path):
    store = harness.Store(tmp_path / "t.json", "training")
    store.data.update(configs={}, splits={}, rates={})
    args = T.parse_args(["--pairs", PAIR, "--paths", "eager", "eager_cl", "--threads", "1"])
    [(threads, group, cells, splits)] = T.plan(args, store)
    assert threads == 1 and cells == _cells(PAIR, ["eager", "eager_cl"]) and splits == cells
    for key in cells:
        store.cells[key] = {"status": "ok", "ms": 2.0 if "eager_cl" in key else 1.0}
        store.data["splits"][key] = {}
    assert T.plan(args, store) == []
    forced = T.parse_args(["--pairs", PAIR, "--paths", "eager", "--threads", "1", "--force"])
    assert T.plan(forced, store)[0][2] == _cells(PAIR, ["eager"])
    assert T.nchw_is_faster(store.data, _cells(PAIR, ["eager_cl"])[0])


def test_groups_merge_pairs_that_share_a_model():
    groups = T.groups_of(T.selected_pairs(["fmnist"]))
    assert groups[0] == ["fmnist/mobilenetv1_bft_100@28", "fmnist/mobilenetv1_025@28",
                         "fmnist/mobilenetv1_bft_100@24"]
    assert len(groups) == 3 and len(T.groups_of(T.selected_pairs(["all"]))) == 6


def test_non_finite_loss_fails_the_step():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        net[1].weight.fill_(math.nan)
    runner = T.Runner(net, torch.randn(2, 1, 2, 2), torch.tensor([0, 1]))
    times, failed = harness.interleave({"nan": runner}, harness.Timing(1, 1, 0, 0))
    assert failed["nan"].startswith("FloatingPointError: non-finite loss")


@pytest.mark.skipif(not kernel_available(), reason="the C++ kernels did not build")
def test_attribution_of_forward_and_backward(one_thread):
    """Every convolution_backward goes to the module whose forward created it: the 1-channel stem
    is not depthwise; the BFT's backward is BFT; BatchNorm backward is BatchNorm; the library's
    depthwise operator (forward and backward) is depthwise, not BFT."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),                 # stem: other
        nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False),     # depthwise
        nn.BatchNorm2d(16), nn.ReLU(),
        DepthwiseConv2d(16, 16, 3, padding=1, groups=16, bias=False),  # depthwise (operator)
        butterfly.BFT(16, 32),                                      # bft
        nn.Conv2d(32, 24, 1, bias=False),                           # pointwise
        nn.BatchNorm2d(24), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10))
    runner = T.Runner(net, torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,)))
    runner()
    from torch.profiler import ProfilerActivity, profile
    with T.labelled(net), profile(activities=[ProfilerActivity.CPU]) as prof:
        runner()
    assert all("forward" not in vars(m) for m in net.modules())  # the labels are removed
    got = {}
    for e, category, phase in T.attribute(prof.events()):
        if e.name in ("aten::convolution_backward", "aten::native_batch_norm_backward",
                      "aten::convolution", "aten::native_batch_norm") or "butterfly" in e.name:
            got.setdefault((e.name, phase), []).append(category)
    assert sorted(got[("aten::convolution", "forward")]) == ["depthwise", "other", "pointwise"]
    assert sorted(got[("aten::convolution_backward", "backward")]) == [
        "depthwise", "other", "pointwise"]
    assert got[("aten::native_batch_norm_backward", "backward")] == ["batchnorm"] * 3
    def categories(part):
        return {c for (name, _), cats in got.items() if "butterfly" in name and part(name)
                for c in cats}
    assert categories(lambda name: "depthwise" not in name and "dw_" not in name
                      and "bn_act" not in name and "batch_norm" not in name) == {"bft"}
    assert T.op_category("butterfly_cpu::bn_act_backward") == "batchnorm"
    assert categories(lambda name: "depthwise" in name or "dw_" in name) == {"depthwise"}
    assert any(phase == "backward" for name, phase in got
               if "butterfly" in name and "depthwise" not in name)
    assert any(phase == "backward" for name, phase in got if "dw_backward" in name)
    split = T.split_of(prof.events(), 1)
    assert sum(split["share"].values()) == pytest.approx(100.0)
    assert split["self_cpu_us"]["other"]["optimizer"] > 0
