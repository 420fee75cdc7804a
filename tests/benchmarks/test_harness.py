"""The harness: the interleaved timer's rules, the results store, the machine description, the
report writer; and the "what bounds it" arithmetic of benchmarks.bounds."""
import json

import pytest
import torch
from torch import nn

import butterfly
from benchmarks import bounds, harness


class Clock:
    """A fake clock: every reading advances 1 ms, so each timed call takes exactly 1 ms."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        self.t += 1e-3
        return self.t


def test_interleave_rotates_settles_and_counts():
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    timing = harness.Timing(rounds=3, calls=2, min_time_s=0.0, settle_s=0.0)
    times, failed = harness.interleave(steps, timing, clock=Clock())
    assert failed == {}
    assert {k: len(v) for k, v in times.items()} == {"a": 6, "b": 6, "c": 6}
    assert all(t == pytest.approx(1e-3) for v in times.values() for t in v)
    # per round and step: one untimed call, then 2 timed; round r starts at step r
    assert "".join(calls) == "aaabbbccc" + "bbbcccaaa" + "cccaaabbb"


def test_interleave_min_time_adds_calls():
    n = [0]
    times, _ = harness.interleave({"s": lambda: n.__setitem__(0, n[0] + 1)},
                                  harness.Timing(rounds=1, calls=1, min_time_s=0.02,
                                                 settle_s=0.0))
    assert len(times["s"]) > 1 and n[0] == len(times["s"]) + 1


def test_failing_step_is_recorded_and_dropped():
    count = [0]

    def flaky():
        count[0] += 1
        if count[0] > 2:
            raise ValueError("boom\nsecond line")

    times, failed = harness.interleave({"flaky": flaky, "fine": lambda: None},
                                       harness.Timing(rounds=3, calls=2, settle_s=0.0))
    assert failed == {"flaky": "ValueError: boom"}
    assert count[0] == 3  # not called again after it raised
    assert len(times["fine"]) == 6


def test_summary():
    s = harness.summary([0.004, 0.001, 0.003, 0.002, 0.005])
    assert s["ms"] == pytest.approx(3.0) and s["min_ms"] == pytest.approx(1.0)
    assert s["q1_ms"] < s["ms"] < s["q3_ms"] and s["samples"] == 5
    one = harness.summary([0.002])
    assert one["ms"] == one["q1_ms"] == one["q3_ms"] == pytest.approx(2.0)


def test_machine_description():
    m = harness.machine(extra="x")
    assert m["cpu"] and m["extra"] == "x" and m["torch"] == torch.__version__
    flags = [f for f in m["flags"].split(", ") if not f.startswith("none of")]
    assert set(flags) <= set(harness.ISA_FLAGS)
    assert m["logical_cpus"] >= m["usable_cpus"] >= 1 and m["torch_threads"] >= 1
    assert len(m["load"]) in (0, 3)
    assert m["cpu"] in harness.describe(m)
    assert "ISA flags not recorded" in harness.describe({"cpu": "X"})


def test_store_measure_and_round_trip(tmp_path, one_thread):
    path = tmp_path / "r.json"
    store = harness.Store(path, "demo")
    store.start("demo", ["--quick"], note="n")

    def broken():
        raise RuntimeError("cannot prepare")

    cells = harness.measure(store, {"a": lambda: (lambda: None, {"info": 1}), "b": broken},
                            harness.Timing(rounds=2, calls=2, settle_s=0.0), threads=1,
                            meta={"a": {"m": 2}}, batch=4, kind="k")
    assert cells["a"]["status"] == "ok" and cells["a"]["samples"] == 4
    assert cells["a"]["info"] == 1 and cells["a"]["m"] == 2 and cells["a"]["kind"] == "k"
    assert cells["a"]["img_s"] == pytest.approx(4e3 / cells["a"]["ms"])
    assert cells["b"] == {**cells["b"], "status": "failed", "reason": "RuntimeError: cannot prepare"}
    store.save()
    data = json.loads(path.read_text())
    assert data["format"] == harness.FORMAT and data["benchmark"] == "demo"
    assert data["cells"]["a"]["run"] == data["runs"][0]["id"] == 1
    assert data["runs"][0]["command"] == "python -m benchmarks.demo --quick"
    assert data["runs"][0]["machine"]["cpu"] and "load_after" in data["runs"][0]
    again = harness.Store(path, "demo")
    assert again.todo(["a", "b", "c"]) == ["c"]
    assert again.todo(["a", "b", "c"], retry_failed=True) == ["b", "c"]
    assert again.todo(["a", "b"], force=True) == ["a", "b"]
    # a second run that re-measures every cell leaves the first run unnamed: it is dropped
    again.start("demo", [])
    again.put("a", {"status": "ok"})
    again.put("b", {"status": "ok"})
    again.save()
    assert [r["id"] for r in json.loads(path.read_text())["runs"]] == [2]
    assert harness.Store(path, "demo", keep=False).cells == {}


def test_table():
    lines = harness.table(["a", "b"], [[1, 2], ["x", "y"]], "lr")
    assert lines == ["| a | b |", "|---|---:|", "| 1 | 2 |", "| x | y |"]


def test_floors_by_hand():
    profile = {"macs_by_kind": {"dense": 2e6, "depthwise": 1e6, "bft": 3e6},
               "act_bytes_layers": 4e6, "weight_bytes": 3.2e6}
    rates = {"copy_GBs": 10.0, "dense_GMACs": 100.0, "depthwise_GMACs": 10.0, "bft_GMACs": 30.0}
    f = bounds.floors(profile, rates, bounds.TRAINING, batch=32)
    # memory: (2.5 * 4 MB + 8 * 3.2 MB / 32) at 10 GB/s = 1.08 ms
    assert f["memory_ms"] == pytest.approx(1.08)
    # compute: 3 * (2e6 / 100e9 + 1e6 / 10e9 + 3e6 / 30e9) s = 0.66 ms; without BFT 0.36 ms
    assert f["compute_ms"] == pytest.approx(0.66) and f["rest_ms"] == pytest.approx(0.36)
    assert f["bound_ms"] == pytest.approx(1.08) and f["kind"] == "memory"
    inference = bounds.floors(profile, rates, bounds.INFERENCE)
    assert inference["memory_ms"] == pytest.approx(0.72) and inference["kind"] == "memory"
    assert bounds.floors(profile, {**rates, "bft_GMACs": None}, bounds.TRAINING) is None
    assert bounds.floors({"macs": 1}, rates, bounds.TRAINING) is None


def test_parity():
    # 1e8 BFT multiply-adds in the 10 - 1 ms the rest of the model leaves: 11 GMAC/s
    assert "11 GMAC/s" in bounds.parity(1e8, 1.0, 10.0, 20.0)
    assert "no BFT kernel speed" in bounds.parity(1e8, 2.0, 1.5, 20.0)


def test_layer_profile_counts_by_kind():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False),              # dense
                        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),    # depthwise
                        butterfly.BFT(8, 16), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(16, 10)).train()
    p = bounds.layer_profile(net, 6)
    assert net.training  # the mode is restored
    px = 36
    assert p["macs_by_kind"] == {"dense": 8 * 3 * 9 * px + 16 * 10, "depthwise": 8 * 9 * px,
                                 "bft": net[2].macs_per_pixel * px}
    assert p["weight_bytes"] == 4 * sum(q.numel() for q in net.parameters())
    # layers only: the two convs, the BFT and the linear layer, inputs and outputs, float32
    assert p["act_bytes_layers"] == 4 * ((3 + 8) * px + (8 + 8) * px + (8 + 16) * px + 16 + 10)
    assert p["act_bytes"] > p["act_bytes_layers"]


def test_section_rows_and_pairs():
    rates = {"t1": {"threads": 1, "date": "d", "copy_GBs": 10.0, "fma_GMACs": 100.0,
                    "dense_GMACs": 40.0, "depthwise_GMACs": 10.0, "bft_GMACs": 20.0}}
    profiles = {"bft": {"macs": 11e7, "macs_by_kind": {"dense": 0, "depthwise": 1e7, "bft": 1e8},
                        "act_bytes_layers": 4e8, "weight_bytes": 0},
                "base": {"macs": 1e8, "macs_by_kind": {"dense": 1e8, "depthwise": 0, "bft": 0},
                         "act_bytes_layers": 1e8, "weight_bytes": 0}}
    lines = bounds.section(profiles, rates, lambda key, t, b: (10.0, "eager"), [1],
                           [("pair", "bft", "base")], bounds.INFERENCE)
    rows = [ln for ln in lines if ln.startswith("| bft |") or ln.startswith("| base |")]
    assert len(rows) == 2
    # BFT model: memory 40 ms > compute 6 ms (1 ms with the BFT layers free)
    assert rows[0].split(" | ")[5:7] == ["40.000", "6.000 (1.000)"]
    assert [ln for ln in lines if ln.startswith("* **pair**")]
    assert bounds.section(profiles, {}, lambda *a: None, [1], [], bounds.INFERENCE) == []


def test_rates_quick(one_thread):
    r = bounds.rates(1, quick=True)
    assert r["failed"] == {} and r["threads"] == 1 and r["quick"]
    for key in ("fma_GMACs", "copy_GBs", "dense_GMACs", "depthwise_GMACs", "bft_GMACs"):
        assert r[key] > 0, key
