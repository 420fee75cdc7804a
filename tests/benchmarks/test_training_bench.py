"""``python -m benchmarks.training``: end to end on the smallest pair (``--quick``, 1 thread, a
temporary ``--out-dir``), failing paths recorded, the cache, and the training-step split."""
import json
import math

import pytest
import torch
from torch import nn

import butterfly
from benchmarks import training as T
from butterfly.depthwise import DepthwiseConv2d, kernel_available

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


def test_all_requested_cells_present(quick_run):
    out, data = quick_run
    keys = _cells(PAIR, ["eager", "eager_cl", "compile"])
    assert set(keys) <= set(data["cells"])
    for key in _cells(PAIR, ["eager", "eager_cl"]):
        cell = data["cells"][key]
        assert cell["status"] == "ok", cell
        assert cell["quick"] and cell["steps"] >= 6 and cell["threads"] == 1
        assert cell["ms"] > 0 and math.isclose(cell["img_s"], T.BATCH * 1e3 / cell["ms"],
                                               rel_tol=1e-3)
        assert cell["load_before"] is not None and math.isfinite(cell["loss"])
    for config in T.pair_configs(T.PAIRS[PAIR]):
        assert data["configs"][config]["macs"] > 0
    run = data["runs"][-1]
    assert run["note"] == "test" and "--quick" in run["command"] and run["load_after"]
    md = (out / T.MD_NAME).read_text()
    assert "## 1 thread, batch 32" in md and PAIR in md and "note: test" in md
    assert "| **" in md  # the pair's ratio


def test_failing_path_is_recorded(quick_run):
    _, data = quick_run
    for key in _cells(PAIR, ["compile"]):
        cell = data["cells"][key]
        assert cell["status"] == "failed"
        assert cell["reason"] == "RuntimeError: compiler unavailable"


def test_split_shares_sum_to_100(quick_run):
    _, data = quick_run
    nchw = [k for k in _cells(PAIR, ["eager"])]
    assert set(nchw) <= set(data["splits"])
    for split in data["splits"].values():
        assert split["status"] == "ok", split
        assert sum(split["share"].values()) == pytest.approx(100.0, abs=0.01)
        assert split["profiled_step_ms"] > 0
    bft = data["splits"][nchw[0]]
    assert bft["config"].split("/")[1].startswith("mobilenetv3_small_bft")
    assert bft["share"]["bft"] > 0 and bft["share"]["depthwise"] > 0
    assert bft["share"]["bft"] >= bft["butterfly_ops_share"] > 0
    base = data["splits"][nchw[1]]
    assert base["share"]["bft"] == 0 and base["share"]["pointwise"] > 0


def test_rerun_uses_the_cache(quick_run):
    out, data = quick_run
    args = T.parse_args(["--quick", "--pairs", PAIR, "--paths", "eager", "eager_cl",
                         "--threads", "1", "--out-dir", str(out)])
    assert T.plan(args, data) == []
    forced = T.parse_args(["--pairs", PAIR, "--paths", "eager", "--threads", "1", "--force"])
    assert T.plan(forced, data)[0][2] == _cells(PAIR, ["eager"])


def test_failure_during_timing_is_recorded():
    class Flaky:
        calls = 0

        def step(self):
            Flaky.calls += 1
            if Flaky.calls > 2:
                raise ValueError("boom")

        def check(self):
            pass

    class Fine:
        def step(self):
            pass

        def check(self):
            pass

    times, failed = T.time_interleaved({"flaky": Flaky(), "fine": Fine()}, T.TIMING["quick"])
    assert failed == {"flaky": "ValueError: boom"}
    assert len(times["fine"]) == T.TIMING["quick"]["rounds"] * T.TIMING["quick"]["block"]


def test_step_bounds_by_hand():
    meta = {"macs_by_kind": {"dense": 2e6, "depthwise": 1e6, "bft": 3e6},
            "act_bytes_layers": 4e6, "act_bytes": 10e6, "weight_bytes": 3.2e6}
    rates = {"copy_GBs": 10.0, "dense_GMACs": 100.0, "depthwise_GMACs": 10.0, "bft_GMACs": 30.0}
    b = T.step_bounds(meta, rates, batch=32)
    # memory: (2.5 * 4 MB + 8 * 3.2 MB / 32) at 10 GB/s = 10.8 MB / 10 GB/s = 1.08 ms
    assert b["memory_ms"] == pytest.approx(1.08)
    # compute: 3x (2e6 / 100e9 + 1e6 / 10e9 + 3e6 / 30e9) s = 3 * 0.22 ms = 0.66 ms
    assert b["compute_ms"] == pytest.approx(0.66)
    assert b["rest_ms"] == pytest.approx(0.36)
    assert b["bound_ms"] == pytest.approx(1.08) and b["kind"] == "memory"
    assert b["working_set_MB"] == pytest.approx(320)
    assert T.step_bounds(meta, {**rates, "bft_GMACs": None}, 32) is None
    assert T.step_bounds({"macs": 1}, rates, 32) is None


def test_bounds_section_in_the_report(quick_run):
    out, data = quick_run
    rates = data["rates"]["t1"]
    assert rates["copy_GBs"] > 0 and rates["bft_GMACs"] > 0 and rates["quick"]
    for config in T.pair_configs(T.PAIRS[PAIR]):
        meta = data["configs"][config]
        assert meta["act_bytes_layers"] > 0 and meta["weight_bytes"] > 0
        assert sum(meta["macs_by_kind"].values()) > 0
    lines = T.bounds_lines(data, threads=1, batch=T.BATCH)
    assert lines[1] == "### What bounds it"
    assert sum(1 for line in lines if line.startswith("| fmnist |")) == 2
    pair_line = [line for line in lines if line.startswith(f"* **{PAIR}**")]
    assert len(pair_line) == 1 and "layers-only activation bytes" in pair_line[0]
    assert "### What bounds it" in (out / T.MD_NAME).read_text()
    assert T.bounds_lines({**data, "rates": {}}, threads=1, batch=T.BATCH) == []


def test_groups_merge_pairs_that_share_a_model():
    groups = T.groups_of(T.selected_pairs(["fmnist"]))
    assert groups[0] == ["fmnist/mobilenetv1_bft_100@28", "fmnist/mobilenetv1_025@28",
                         "fmnist/mobilenetv1_bft_100@24"]
    assert len(groups) == 3 and len(T.groups_of(T.selected_pairs(["all"]))) == 6


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
    runner.step()
    from torch.profiler import ProfilerActivity, profile
    with T.labelled(net), profile(activities=[ProfilerActivity.CPU]) as prof:
        runner.step()
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
