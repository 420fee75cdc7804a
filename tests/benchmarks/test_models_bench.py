"""``python -m benchmarks.models`` on a tiny budget: the cells it stores, failures recorded, the
cache, the pairing of models, and the report's numbers drawn from the JSON."""
import json
from pathlib import Path

import pytest

from benchmarks import models as bench

PAIR = ["mobilenetv3_small_035", "mobilenetv3_small_bft_050"]
TINY = ["--res", "32", "--threads", "1", "--batch", "1", "--quick"]


def _load(out: Path) -> dict:
    return json.loads((out / bench.JSON_NAME).read_text())


def test_pair_end_to_end(tmp_path, one_thread):
    assert bench.main(["--models", *PAIR, *TINY, "--paths", "eager", "eager_cl",
                       "--note", "test run", "--out-dir", str(tmp_path)]) == 0
    data = _load(tmp_path)
    assert set(data["cells"]) == {bench.cell_key(m, 32, p, 1, 1) for m in PAIR
                                  for p in ("eager", "eager_cl")}
    for key, cell in data["cells"].items():
        assert cell["status"] == "ok" and cell["ms"] > 0 and cell["max_rel_diff"] < 1e-3, key
        assert cell["img_s"] == pytest.approx(1e3 / cell["ms"]) and cell["quick"]
        assert sorted(cell["timed_with"]) == sorted(f"{m}@32" for m in PAIR), key
        assert cell["run"] == 1 and cell["threads"] == 1
    assert data["configs"]["mobilenetv3_small_bft_050@32"]["bft"]
    assert not data["configs"]["mobilenetv3_small_035@32"]["bft"]
    assert data["configs"]["mobilenetv3_small_035@32"]["macs_by_kind"]["dense"] > 0
    run = data["runs"][0]
    assert run["note"] == "test run" and "--res 32" in run["command"] and run["machine"]["flags"]
    assert data["rates"] == {}  # the machine rates only come with the "what bounds it" pair
    assert (tmp_path / bench.MD_NAME).exists() and (tmp_path / bench.PLOT_NAME).stat().st_size


@pytest.mark.slow
def test_fused_and_onnx_paths(tmp_path, one_thread):
    assert bench.main(["--models", PAIR[1], *TINY, "--paths", "fused", "ort", "ort_structured",
                       "--out-dir", str(tmp_path)]) == 0
    cells = _load(tmp_path)["cells"]
    fused = cells[bench.cell_key(PAIR[1], 32, "fused", 1, 1)]
    assert fused["status"] == "ok" and fused["report_summary"] and fused["max_rel_diff"] < 1e-3
    for path in ("ort", "ort_structured"):
        cell = cells[bench.cell_key(PAIR[1], 32, path, 1, 1)]
        assert cell["status"] == "failed" or (cell["onnx_mb"] > 0 and cell["max_rel_diff"] < 1e-3)


def test_failing_path_is_recorded_not_raised(tmp_path, monkeypatch, one_thread):
    def broken(model, x, threads, onnx):
        raise RuntimeError("export exploded\nwith a long traceback")

    calls = [0]

    def dies_later(model, x, threads, onnx):
        def run():
            calls[0] += 1
            if calls[0] > 2:
                raise ValueError("runtime error while timing")
            return model(x)
        return run, {}

    monkeypatch.setitem(bench.PREPARE, "eager_cl", broken)
    monkeypatch.setitem(bench.PREPARE, "compile", dies_later)
    assert bench.main(["--models", PAIR[0], *TINY, "--paths", "eager", "eager_cl", "compile",
                       "--out-dir", str(tmp_path)]) == 0
    cells = _load(tmp_path)["cells"]
    assert cells[bench.cell_key(PAIR[0], 32, "eager", 1, 1)]["status"] == "ok"
    failed = cells[bench.cell_key(PAIR[0], 32, "eager_cl", 1, 1)]
    assert failed["status"] == "failed" and failed["reason"] == "RuntimeError: export exploded"
    late = cells[bench.cell_key(PAIR[0], 32, "compile", 1, 1)]
    assert late["status"] == "failed" and late["reason"].startswith("ValueError: runtime error")


def test_cache_force_and_retry(tmp_path, monkeypatch, one_thread, capsys):
    args = ["--models", PAIR[0], *TINY, "--paths", "eager", "--out-dir", str(tmp_path)]
    with monkeypatch.context() as patch:
        patch.setattr(bench, "build", lambda name: (_ for _ in ()).throw(ValueError("no model")))
        assert bench.main(args) == 0
    key = bench.cell_key(PAIR[0], 32, "eager", 1, 1)
    first = _load(tmp_path)
    assert first["cells"][key]["reason"] == "model: ValueError: no model"
    assert first["configs"][f"{PAIR[0]}@32"]["error"]
    capsys.readouterr()
    assert bench.main(args + ["--dry-run"]) == 0
    assert "0 cells to measure" in capsys.readouterr().out
    assert bench.main(args) == 0 and _load(tmp_path) == first  # cached, the failure too
    assert bench.main(args + ["--retry-failed"]) == 0
    retried = _load(tmp_path)
    assert retried["cells"][key]["status"] == "ok" and retried["cells"][key]["run"] == 2
    assert [r["id"] for r in retried["runs"]] == [2]  # run 1 no longer owns a cell
    assert "error" not in retried["configs"][f"{PAIR[0]}@32"]
    assert bench.main(args + ["--force"]) == 0
    assert _load(tmp_path)["cells"][key]["run"] == 3


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
    args = bench.parse_args(["--configs", "mobilenetv1_bft_100@160", "mobilenetv1_025@224"])
    assert bench.configs_of(args) == [("mobilenetv1_bft_100", 160), ("mobilenetv1_025", 224)]


@pytest.mark.parametrize("argv", [["--models", "no_such_model"], ["--threads", "0"],
                                  ["--configs", "mobilenetv1_025"], ["--batch", "0"],
                                  ["--configs", "mobilenetv1_025@224", "--res", "160"]])
def test_bad_arguments(argv):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)


def _synthetic(times):
    data = {"runs": [], "rates": {}, "configs": {}, "cells": {}}
    for (name, res), ms in times.items():
        data["configs"][bench.config_key(name, res)] = {
            "model": name, "res": res, "bft": "_bft_" in name, "label": bench.LABELS[name],
            "paper": bench.PAPER[(name, res)], "macs": 1e7, "params": 1e6, "act_bytes": 1e6}
        for path, factor in (("eager", 2.0), ("ort", 1.0)):
            data["cells"][bench.cell_key(name, res, path, 2, 1)] = {
                "model": name, "res": res, "path": path, "threads": 2, "batch": 1, "ms": ms * factor,
                "q1_ms": ms, "q3_ms": ms, "status": "ok",
                "timed_with": ["mobilenetv1_bft_100@160", "mobilenetv1_025@224"]}
    return data


def test_report_numbers_come_from_the_cells():
    data = _synthetic({("mobilenetv1_025", 224): 1.0, ("mobilenetv1_050", 224): 2.0,
                       ("mobilenetv1_bft_100", 160): 1.5, ("mobilenetv1_bft_200", 224): 2.5})
    assert bench.best(data, "mobilenetv1_bft_100@160", 2, 1)["path"] == "ort"
    row = next(ln for ln in bench.report(data) if ln.startswith("| MobileNetV1+BFT 1.0 @160 *"))
    assert "**1.50** (1.50 ort / 1.00 ort)" in row and "apart" not in row
    # MobileNetV1 0.5@224 (63.3%, 2 ms) is slower than BFT 1.0@160 and less accurate than BFT
    # 2.0@224 (64.32%): neither BFT configuration is beaten on both
    assert [ln.endswith("no baseline is both faster and more accurate")
            for ln in bench.dominated(data)] == [True, True]
    data["cells"][bench.cell_key("mobilenetv1_050", 224, "ort", 2, 1)]["ms"] = 1.2
    assert "MobileNetV1 0.5 @224 (63.30%, 1.20 ms) beat it on both" in bench.dominated(data)[0]
