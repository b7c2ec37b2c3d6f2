"""scripts/bench.py --parts run: a whole run split into its stages (the shares the README reports)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("superweight_bench", ROOT / "scripts" / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def test_run_part_splits_a_whole_run(bench, tiny_model_dir, one_thread):
    """Every row runs, every stage of the recipe is timed (none twice: the shares add up to the whole), the
    score cache starts empty (scoring is timed, a compact set is written) and the untimed warm-up is apart."""
    r = bench.bench_run(str(tiny_model_dir), ["metric=magnitude,grad_x_weight", "topk=1,3", "seeds=0",
                                              "controls=random_k,bottom_k,matched_k", "select.control_draws=1",
                                              "data.eval_windows=2", "data.calib_windows=1", "data.seq_len=16",
                                              "plots=none"], "disabled")
    assert r["rows"] == 2 * 2 * 4  # metrics x K x (Top-K + three controls, one draw each)
    stages = r["stages_s"]
    for stage in ("load", "scoring", "selection", "summary", "evaluation", "writing", "cache"):
        assert stages.get(stage, 0) > 0, stage
    assert abs(sum(stages.values()) - r["total_s"]) < 1e-6 and stages["other"] >= 0
    assert abs(sum(r["share"].values()) - 1) < 1e-9
    assert r["bookkeeping_share"] == pytest.approx(1 - r["share"]["scoring"] - r["share"]["evaluation"])
    assert r["first_setup_s"] > 0 and r["cache_bytes"] > 0 and r["score_sets"] == 2
    line = bench.run_line("tiny", r)
    assert line.startswith("tiny: 16 rows") and "all but scoring and evaluation" in line
