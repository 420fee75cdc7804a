"""``python -m benchmarks.models`` on a tiny budget: end to end, failures recorded, cells cached."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import models as bench

ROOT = Path(__file__).resolve().parents[1]
PAIR = ["mobilenetv3_small_035", "mobilenetv3_small_bft_050"]
TINY = ["--res", "32", "--threads", "1", "--batch", "1", "--quick"]


def _load(out: Path) -> dict:
    return json.loads((out / bench.JSON_NAME).read_text())


def test_command_end_to_end(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.models", "--models", *PAIR, "--res", "64",
           "--paths", "eager", "eager_cl", "fused", "--threads", "1", "--batch", "1", "--quick",
           "--note", "test run", "--out-dir", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = _load(tmp_path)
    want = {bench.cell_key(m, 64, p, 1, 1) for m in PAIR for p in ("eager", "eager_cl", "fused")}
    assert set(data["cells"]) == want
    for key, cell in data["cells"].items():
        assert cell["status"] in ("ok", "failed"), key
        if cell["status"] == "ok":
            assert cell["ms"] > 0 and cell["calls"] >= 1 and cell["max_rel_diff"] < 1e-3
        else:
            assert cell["reason"]
    for model in PAIR:  # the plain paths must work
        for path in ("eager", "eager_cl"):
            assert data["cells"][bench.cell_key(model, 64, path, 1, 1)]["status"] == "ok"
    assert data["configs"]["mobilenetv3_small_bft_050@64"]["bft"]
    assert data["configs"]["mobilenetv3_small_035@64"]["macs"] > 0
    assert data["runs"][-1]["note"] == "test run"
    assert data["rates"] == {}  # machine rates only come with the "what bounds it" pair
    md = (tmp_path / bench.MD_NAME).read_text()
    assert "test run" in md and "--res 64" in md
    assert "### MobileNetV3-Small 0.35 @64" in md and "### MobileNetV3-Small+BFT 0.5 @64" in md
    assert "| eager_cl |" in md and "| fused |" in md
    assert "BFT vs baseline at the same resolution" in md  # the ratio of the pair at 64
    for key, cell in data["cells"].items():   # the pair was timed side by side
        assert sorted(cell["timed_with"]) == sorted(f"{m}@64" for m in PAIR), key
    assert " apart)" not in md and "apart |" not in md
    assert (tmp_path / bench.PLOT_NAME).stat().st_size > 0
    fused = data["cells"][bench.cell_key(PAIR[0], 64, "fused", 1, 1)]
    if fused["status"] == "ok":
        assert fused["report_summary"]  # str(report)'s summary line is recorded


def test_failing_path_is_recorded_not_raised(tmp_path, monkeypatch, one_thread):
    def broken(ctx):
        raise RuntimeError("export exploded\nwith a long traceback")

    calls = [0]

    def dies_later(ctx):
        def run():
            calls[0] += 1
            if calls[0] > 2:
                raise ValueError("runtime error while timing")
            return ctx.model(ctx.x)
        return run, {}

    monkeypatch.setitem(bench.PREPARE, "eager_cl", broken)
    monkeypatch.setitem(bench.PREPARE, "compile", dies_later)
    assert bench.main(["--models", PAIR[0], *TINY, "--paths", "eager", "eager_cl", "compile",
                       "--out-dir", str(tmp_path)]) == 0
    cells = _load(tmp_path)["cells"]
    assert cells[bench.cell_key(PAIR[0], 32, "eager", 1, 1)]["status"] == "ok"
    failed = cells[bench.cell_key(PAIR[0], 32, "eager_cl", 1, 1)]
    assert failed["status"] == "failed"
    assert failed["reason"] == "RuntimeError: export exploded"
    late = cells[bench.cell_key(PAIR[0], 32, "compile", 1, 1)]
    assert late["status"] == "failed" and late["reason"].startswith("ValueError: runtime error")
    md = (tmp_path / bench.MD_NAME).read_text()
    assert "failed: RuntimeError: export exploded" in md


def test_rerun_skips_cached_cells(tmp_path, monkeypatch, one_thread, capsys):
    args = ["--models", PAIR[0], *TINY, "--paths", "eager", "--out-dir", str(tmp_path)]
    assert bench.main(args) == 0
    first = _load(tmp_path)
    assert len(first["cells"]) == 1 and len(first["runs"]) == 1

    def must_not_run(ctx):
        raise AssertionError("a cached cell was measured again")

    monkeypatch.setitem(bench.PREPARE, "eager", must_not_run)
    capsys.readouterr()
    assert bench.main(args + ["--dry-run"]) == 0
    assert "0 cells to measure" in capsys.readouterr().out
    assert bench.main(args) == 0
    again = _load(tmp_path)
    assert again["cells"] == first["cells"] and again["runs"] == first["runs"]
    assert (tmp_path / bench.MD_NAME).exists()
    monkeypatch.undo()
    # a new cell beside the cached one, then --force re-measures both
    assert bench.main(args[:-3] + ["eager", "eager_cl", "--out-dir", str(tmp_path)]) == 0
    third = _load(tmp_path)
    assert len(third["cells"]) == 2 and len(third["runs"]) == 2
    assert third["cells"][bench.cell_key(PAIR[0], 32, "eager", 1, 1)] == \
        first["cells"][bench.cell_key(PAIR[0], 32, "eager", 1, 1)]
    assert bench.main(args + ["--force"]) == 0
    forced = _load(tmp_path)
    assert forced["cells"][bench.cell_key(PAIR[0], 32, "eager", 1, 1)]["run"] == 3


def test_paper_table_and_pairs():
    assert len(bench.PAPER) == 22
    for bft, bres, base, rres, _ in bench.PAIRS:
        b, r = bench.PAPER[(bft, bres)], bench.PAPER[(base, rres)]
        assert bench.BASELINE_OF[bft] == base or bft == "mobilenetv1_bft_100"
        assert 0.6 <= b["mflops"] / r["mflops"] <= 1.2  # MAC-matched in the paper
        assert b["top1"] > r["top1"]
    assert sum(h for *_, h in bench.PAIRS) == 4


def test_measurement_units_pair_each_bft_model_with_its_baseline():
    configs = [("mobilenetv1_bft_100", 160), ("mobilenetv1_025", 192), ("mobilenetv1_025", 224),
               ("shufflenetv2_bft_125", 128), ("shufflenetv2_050", 128), ("mobilenetv1_050", 224)]
    units = bench.measurement_units(configs)
    assert units[0] == [("mobilenetv1_bft_100", 160), ("mobilenetv1_025", 224)]   # the headline
    assert [("shufflenetv2_bft_125", 128), ("shufflenetv2_050", 128)] in units
    assert [("mobilenetv1_025", 192)] in units and [("mobilenetv1_050", 224)] in units
    assert sorted(c for u in units for c in u) == sorted(configs)


def test_report_summary_lines():
    text = ("optimize_for_inference on cpu: 13 BFT layers, 2 made dense\nfused 40 layers\n"
            "layer   shape\nblocks.0  32->64")
    assert bench.report_summary(text) == ["optimize_for_inference on cpu: 13 BFT layers, "
                                          "2 made dense", "fused 40 layers"]
    assert bench.report_summary("only a title") == ["only a title"]


def test_configs_option_names_exact_configurations():
    args = bench.parse_args(["--configs", "mobilenetv1_bft_100@160", "mobilenetv1_025@224"])
    assert bench.configs_of(args) == [("mobilenetv1_bft_100", 160), ("mobilenetv1_025", 224)]
    assert bench.measurement_units(bench.configs_of(args)) == [bench.configs_of(args)]


@pytest.mark.parametrize("argv", [["--models", "no_such_model"], ["--threads", "0"],
                                  ["--configs", "mobilenetv1_025"],
                                  ["--configs", "mobilenetv1_025@224", "--res", "160"],
                                  ["--configs", "no_such_model@224"]])
def test_bad_arguments(argv):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)


def test_bounds_section_from_synthetic_results():
    rates = {"t1": {"threads": 1, "copy_GBs": 10.0, "dense_GMACs": 40.0, "depthwise_GMACs": 10.0,
                    "bft_GMACs": 20.0, "shapes": "test"}}
    data = {"runs": [], "rates": rates, "configs": {}, "cells": {}}
    for (name, res), macs, act in zip(bench.BOUNDS_PAIR, ({"dense": 0, "depthwise": 10**7,
                                                            "bft": 10**8}, {"dense": 10**8,
                                                                            "depthwise": 0,
                                                                            "bft": 0}),
                                      (4 * 10**8, 10**8)):
        data["configs"][bench.config_key(name, res)] = {
            "model": name, "res": res, "macs": sum(macs.values()), "macs_by_kind": macs,
            "act_bytes": act, "act_bytes_layers": act // 4, "weight_bytes": 0}
        data["cells"][bench.cell_key(name, res, "eager", 1, 32)] = {
            "model": name, "res": res, "path": "eager", "threads": 1, "batch": 32, "status": "ok",
            "ms": 320.0}
    text = "\n".join(bench.bounds_section(data))
    # BFT model: memory 10 ms (layers only) > compute 6 ms; baseline: compute 2.5 ms > memory
    # (in brackets: the BFT model's compute with its BFT layers free, 1 ms of depthwise)
    assert "| 40.00 / 10.00 | 6.00 (1.00) |" in text and "memory (1.7x the other)" in text
    assert "| 10.00 / 2.50 | 2.50 |" in text
    assert "4.0x the activation bytes" in text and "measured at batch 32: 10.00 vs 10.00" in text
    assert "still computes for 1.00 ms (0.40x the baseline's bound)" in text
    # parity with the baseline's 10 ms: 1e8 BFT MACs in 10 - 1 ms
    assert "parity needs the BFT layers at 11 GMAC/s or more, measured 20" in text
    assert "no BFT kernel speed" in bench.parity_text(10**8, 2.0, 1.5, 20.0)
    # only pairs with both models measured get rows
    assert "shufflenetv2" not in text


def test_pareto_frontier_and_dominated_configurations():
    assert bench.pareto([(1.0, 2.0), (0.5, 1.0), (2.0, 1.5), (3.0, 3.0)]) == \
        [(0.5, 1.0), (1.0, 2.0), (3.0, 3.0)]
    data = {"runs": [], "rates": {}, "configs": {}, "cells": {}}
    for name, res, ms in [("mobilenetv1_025", 224, 1.0), ("mobilenetv1_050", 224, 2.0),
                          ("mobilenetv1_bft_100", 160, 1.5), ("mobilenetv1_bft_200", 224, 2.5),
                          ("shufflenetv2_050", 224, 0.1)]:
        key = bench.config_key(name, res)
        data["configs"][key] = {"model": name, "res": res, "bft": "_bft_" in name,
                                "label": bench.LABELS[name], "paper": bench.PAPER[(name, res)]}
        data["cells"][bench.cell_key(name, res, "eager", 2, 1)] = {
            "model": name, "res": res, "path": "eager", "threads": 2, "batch": 1, "status": "ok",
            "ms": ms}
    lines = bench.dominated(data)
    # MobileNetV1 0.5@224 (63.3%, 2 ms) is slower than BFT 1.0@160 and less accurate than BFT
    # 2.0@224 (64.32%): neither is beaten; ShuffleNetV2's baseline never counts for MobileNetV1
    assert lines == ["- MobileNetV1+BFT 1.0 @160 (54.30%, 1.50 ms): no baseline is both faster "
                     "and more accurate",
                     "- MobileNetV1+BFT 2.0 @224 (64.32%, 2.50 ms): no baseline is both faster "
                     "and more accurate"]
    data["cells"][bench.cell_key("mobilenetv1_050", 224, "eager", 2, 1)]["ms"] = 1.2
    assert "MobileNetV1 0.5 @224 (63.30%, 1.20 ms) beat it on both" in bench.dominated(data)[0]


def test_failing_model_is_recorded_and_retried(tmp_path, monkeypatch, one_thread):
    def no_model(name):
        raise ValueError(f"cannot build {name}")

    args = ["--models", PAIR[0], *TINY, "--paths", "eager", "--out-dir", str(tmp_path)]
    with monkeypatch.context() as patch:
        patch.setattr(bench, "build", no_model)
        assert bench.main(args) == 0
    cell = _load(tmp_path)["cells"][bench.cell_key(PAIR[0], 32, "eager", 1, 1)]
    assert cell["status"] == "failed" and cell["reason"] == f"model: ValueError: cannot build {PAIR[0]}"
    assert "The model failed" in (tmp_path / bench.MD_NAME).read_text()
    assert bench.main(args) == 0  # cached, failure included
    assert _load(tmp_path)["cells"][bench.cell_key(PAIR[0], 32, "eager", 1, 1)]["status"] == "failed"
    assert bench.main(args + ["--retry-failed"]) == 0
    data = _load(tmp_path)
    assert data["cells"][bench.cell_key(PAIR[0], 32, "eager", 1, 1)]["status"] == "ok"
    assert "error" not in data["configs"][bench.config_key(PAIR[0], 32)]
