"""Killed runs lose nothing: SIGKILL a real `superweight run` process (forked from the warm test process) at each kill point (during scoring,
between perturbations, with an output's temp file written but not renamed, after the outputs but before
publishing), then rerun with the same out_dir. After every kill no output file is half-written (each is
absent or parses, temp files are hidden dot files that the next run deletes); every rerun reuses the
finished rows (its "resuming: N finished rows" line) and the final files are byte-identical to an
uninterrupted run's. A local sweep killed between runs skips the finished run and completes the rest.

Kill points are set with SUPERWEIGHT_TEST_KILL_AT (superweight.files.kill_point: the process SIGKILLs itself
there, so no `finally` or atexit runs, as under `kill -9` or the OOM killer)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors import safe_open

from conftest import run_forked

from superweight.arguments import parse_config
from superweight.commands.run import make_experiment, run_experiment
from superweight.run.experiment import Experiment
from superweight.files import read_jsonl
from superweight.edge.sweep import is_finished

# Compared byte for byte. The safetensors files are compared by content (tensors bit for bit and the
# metadata dict): safetensors writes its metadata map in a per-process hash order, so its header bytes vary.
OUTPUTS = ["results.csv", "perturbation_results.json", "gaps.csv", "effects.csv", "rankings.csv", "stability.csv",
           "stability_summary.csv"]
SCORES = "sensitivity_scores.safetensors"
TENSOR_FILES = [SCORES, "selections.safetensors"]
# 2 metrics x 2 seeds x (top_k + 2 random_k draws) x 1 K x 2 perturbations = 24 rows (+ the baseline entry)
ROWS = 24
WORDS = ("the of and a to in is was he for it with as his on be at by had are but from or have an they which one "
         "you were her all she there would their we him been has when who will more no if out so said what up its "
         "about into than them can only other new some could time these two may then do first any my now such").split()


pytestmark = pytest.mark.usefixtures("one_thread")


def corpus_file(d: Path) -> Path:
    """A small deterministic text corpus (quick to tokenize; ~1,500 words)."""
    import random

    rng = random.Random(0)
    p = d / "corpus.txt"
    p.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(30)) + "." for _ in range(50)) + "\n")
    return p


def run_args(model_dir, out_dir, cache_dir, corpus) -> list[str]:
    return [f"model={model_dir}", "metric=magnitude,grad_x_weight", "seeds=0,1", "topk=3", "controls=random_k",
            "perturb=zero,bit_flip", f"corpus={corpus}", "data.seq_len=16",
            "data.eval_windows=2", "data.calib_windows=2", "wandb.mode=disabled", "plots=none",
            f"out_dir={out_dir}", f"cache_dir={cache_dir}"]


def same_scores_file(a: Path, b: Path) -> None:
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        assert fa.metadata() == fb.metadata()
        assert sorted(fa.keys()) == sorted(fb.keys())
        for k in fa.keys():
            ta, tb = fa.get_tensor(k), fb.get_tensor(k)
            assert ta.dtype == tb.dtype and ta.shape == tb.shape and ta.view(-1).view(torch.uint8).equal(
                tb.view(-1).view(torch.uint8)), k


def cli(args: list[str], kill_at: str | None = None) -> subprocess.CompletedProcess:
    """`superweight <args>` in a process forked from a warm fork server (imports done once: no cold
    interpreter per run; autograd cannot run in a child forked from this test process, which ran backward
    passes), SUPERWEIGHT_TEST_KILL_AT set in the child only. A kill point SIGKILLs the child itself, as `kill -9`
    would a real run: its return code is -SIGKILL and no `finally` or atexit runs."""
    env = {"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "SUPERWEIGHT_TEST_KILL_AT": kill_at or ""}
    return run_forked(args, env)


def test_fork_server_children_start_warm(tmp_path):
    """The runs here are forked from a fork server so that each skips seconds of imports: a child must find
    everything in FORK_PRELOAD imported already (the fork server drops a module it cannot import silently)."""
    import multiprocessing

    from conftest import FORK_PRELOAD, _imported

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(FORK_PRELOAD)
    p = ctx.Process(target=_imported, args=(FORK_PRELOAD, str(tmp_path / "imported")))
    p.start()
    p.join(120)
    assert p.exitcode == 0 and (tmp_path / "imported").read_text().split() == FORK_PRELOAD


def check_no_half_files(out: Path) -> dict[str, str]:
    """Every visible file parses completely; hidden files are the progress log (every line but a torn
    last one parses) or temp files of an interrupted atomic write. Returns {name: kind}."""
    kinds = {}
    for p in sorted(out.iterdir()):
        if p.is_dir():
            continue
        if p.name == ".progress.jsonl":
            lines = p.read_text().splitlines()
            for ln in lines[:-1]:
                json.loads(ln)
            kinds[p.name] = "progress"
        elif p.name.startswith("."):
            assert p.name.endswith(".tmp"), f"unexpected hidden file {p.name}"
            kinds[p.name] = "temp"
        elif p.suffix == ".csv":
            pd.read_csv(p)
            assert p.read_bytes().endswith(b"\n")
            kinds[p.name] = "csv"
        elif p.suffix == ".json":
            json.loads(p.read_text())
            kinds[p.name] = "json"
        elif p.suffix == ".safetensors":
            with safe_open(str(p), "pt") as f:
                for k in f.keys():
                    f.get_tensor(k)
            kinds[p.name] = "safetensors"
        else:
            raise AssertionError(f"unexpected output file {p.name}")
    return kinds


def progress_entries(out: Path) -> list[dict]:
    return read_jsonl(out / ".progress.jsonl")


def finished(out: Path) -> bool:
    """The record `superweight run` appends once the run (and its W&B record) is complete."""
    return any(e.get("key") == ["finished"] for e in progress_entries(out)[1:])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return corpus_file(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory, corpus):
    """An uninterrupted run (in-process, its own cache)."""
    d = tmp_path_factory.mktemp("reference")
    cfg = parse_config(run_args(tiny_model_dir, d / "out", d / "cache", corpus))
    run_experiment(make_experiment(cfg, progress=False))
    assert finished(d / "out") and is_finished(d / "out", cfg)
    return d / "out"


def test_killed_run_resumes_to_identical_results(tiny_model_dir, tmp_path, reference, corpus, monkeypatch, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["run", *run_args(tiny_model_dir, out, cache, corpus)]
    produced = {}

    # 1. killed between perturbations: right after the 5th record (the baseline and 4 result rows)
    p = cli(args, kill_at="row:5")
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert check_no_half_files(out) == {".progress.jsonl": "progress"}
    entries = progress_entries(out)
    assert "config_hash" in entries[0] and len(entries) == 1 + 5  # header, baseline, 4 rows
    produced["row:5"] = "progress log: header + baseline + 4 rows; no output files"

    # 2. killed during scoring: grad_x_weight seed 0 computed, not yet cached. The rerun reuses 5 records.
    p = cli(args, kill_at="score:grad_x_weight.seed0")
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert "resuming: 5 finished rows" in p.stdout
    assert check_no_half_files(out) == {".progress.jsonl": "progress"}
    assert len(progress_entries(out)) == 1 + 1 + ROWS // 2  # magnitude done, grad_x_weight not started
    assert not finished(out)
    scores = sorted(q.name for q in (cache / "scores").iterdir())
    assert len(scores) == 2 and not any(n.endswith(".tmp") for n in scores)  # magnitude's compact sets, seeds 0, 1
    # a kill in the middle of an append leaves a torn last line: the next run must ignore it, and lose nothing
    with open(out / ".progress.jsonl", "a") as f:
        f.write('{"key": ["row", "grad_x_weight", 0, "glo')
    produced["score:grad_x_weight.seed0"] = f"progress log: header + baseline + {ROWS // 2} rows; 2 cached score sets"

    # 3. killed while writing outputs: rankings.csv's temp file is complete, not yet renamed
    p = cli(args, kill_at="write:rankings.csv")
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert f"resuming: {1 + ROWS // 2} finished rows" in p.stdout
    kinds = check_no_half_files(out)
    temps = [n for n, k in kinds.items() if k == "temp"]
    assert len(temps) == 1 and temps[0].startswith(".rankings.csv."), kinds
    assert not (out / "rankings.csv").exists() and not (out / "manifest.json").exists()
    for name in ("results.csv", "perturbation_results.json", "gaps.csv", "effects.csv"):  # written before the kill
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert len(progress_entries(out)) == 2 + ROWS and not finished(out)
    produced["write:rankings.csv"] = f"results.csv ... effects.csv final, {temps[0][:15]}... temp"

    # 4. killed after all outputs, before W&B and the `finished` record: the stale temp file is gone
    p = cli(args, kill_at="publish")
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert f"resuming: {1 + ROWS} finished rows" in p.stdout
    kinds = check_no_half_files(out)
    assert "temp" not in kinds.values(), kinds
    assert set(OUTPUTS) | set(TENSOR_FILES) | {"manifest.json"} <= set(kinds)
    assert not finished(out)  # a sweep would run it again (and publish it)
    produced["publish"] = "all outputs final, no 'finished' record"

    # 5. the rerun completes without evaluating a single perturbation again
    calls = []
    orig = Experiment.perturb_evaluate
    monkeypatch.setattr(Experiment, "perturb_evaluate", lambda self, *a: calls.append(a) or orig(self, *a))
    exp = make_experiment(parse_config(args[1:]), progress=False)
    run_experiment(exp)
    assert f"resuming: {1 + ROWS} finished rows" in capsys.readouterr().out
    assert calls == []
    assert exp.loaded.cache.misses == 0 and exp.loaded.cache.hits == 4  # every score set came from the cache
    for name in OUTPUTS:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    for name in TENSOR_FILES:
        same_scores_file(out / name, reference / name)
    man = json.loads((out / "manifest.json").read_text())
    assert finished(out) and man["config_hash"] == json.loads((reference / "manifest.json").read_text())["config_hash"]
    entries = progress_entries(out)
    assert len(entries) == 3 + ROWS  # header, baseline, rows, finished: the torn line was ended, nothing twice
    assert len({json.dumps(e.get("key")) for e in entries[1:]}) == 2 + ROWS
    check_no_half_files(out)
    print("kill points:", produced)


def test_rerun_with_another_config_starts_over(tiny_model_dir, tmp_path, reference, corpus, capsys):
    """Finished rows are reused only under the config hash that produced them."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ".progress.jsonl").write_text((reference / ".progress.jsonl").read_text())
    cfg = parse_config([f"model={tiny_model_dir}", "metric=magnitude", "topk=1", "controls=random_k", "seeds=0",
                        f"corpus={corpus}", "data.seq_len=16", "data.eval_windows=2", "data.calib_windows=1", "wandb.mode=disabled",
                        "plots=none", f"out_dir={out}", f"cache_dir={tmp_path / 'cache'}"])
    run_experiment(make_experiment(cfg, progress=False))
    assert "resuming" not in capsys.readouterr().out
    # header, baseline, top_k and two random_k draws, finished: only this config's
    assert len(progress_entries(out)) == 1 + 1 + 3 + 1
    assert json.loads((out / "manifest.json").read_text())["config_hash"] != json.loads(
        (reference / "manifest.json").read_text())["config_hash"]


@pytest.mark.slow  # five cold interpreters: `superweight sweep` starts each run as `python -m superweight run`
def test_killed_sweep_resumes(tiny_model_dir, tmp_path, corpus):
    """`superweight sweep` SIGKILLed (with its run) right after run 1 finished; rerun: run 1 is skipped,
    run 2 completes with the same results as the same run done directly."""
    sweep = {
        "name": "killtest", "method": "grid",
        "command": ["${env}", "${interpreter}", "-m", "superweight", "run", "${args}"],
        "parameters": {  # the W&B config's keys: full dotted names, list options as lists
            "model.name": {"value": str(tiny_model_dir)}, "score.metrics": {"value": ["magnitude"]},
            "select.topk": {"values": [[1], [3]]}, "seeds": {"value": [0]}, "select.controls": {"value": ["random_k"]},
            "data.corpus": {"value": str(corpus)},
            "data.seq_len": {"value": 16}, "data.eval_windows": {"value": 2}, "data.calib_windows": {"value": 1},
            "wandb.mode": {"value": "disabled"}, "plots": {"value": ["none"]},
            "cache_dir": {"value": str(tmp_path / "cache")},
        },
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    sdir = tmp_path / "sweep"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("SUPERWEIGHT_TEST_KILL_AT", None)
    cmd = [sys.executable, "-m", "superweight", "sweep", str(path), "--sweep-dir", str(sdir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                            start_new_session=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("[2/2]"):  # run 1 returned; run 2 is being started: kill sweep and run
                os.killpg(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.wait(timeout=300)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    planned = [Path(r["out_dir"]) for r in json.loads((sdir / "sweep.json").read_text())["runs"]]
    assert len(planned) == 2
    runs = [d for d in planned if d.is_dir()]
    assert len(runs) >= 1
    first = [d for d in runs if (d / "manifest.json").exists()]
    assert len(first) == 1 and finished(first[0])
    for d in runs:
        check_no_half_files(d)
    before = {n: (first[0] / n).read_bytes() for n in [*OUTPUTS, *TENSOR_FILES, "manifest.json"]}

    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "[1/2] finished, skipping" in p.stdout and "2/2 runs finished" in p.stdout
    assert {n: (first[0] / n).read_bytes() for n in before} == before  # untouched
    runs = [d for d in planned if d.is_dir()]
    second = [d for d in runs if d != first[0]]
    assert len(second) == 1 and finished(second[0])
    # the same run done directly (in-process) gives the same bytes
    man = json.loads((second[0] / "manifest.json").read_text())
    direct = tmp_path / "direct"
    cfg = parse_config([f"model={tiny_model_dir}", "metric=magnitude", f"topk={man['config']['select']['topk'][0]}",
                        "seeds=0", "controls=random_k", f"corpus={corpus}", "data.seq_len=16", "data.eval_windows=2",
                        "data.calib_windows=1", "wandb.mode=disabled", "plots=none", f"out_dir={direct}",
                        f"cache_dir={tmp_path / 'cache'}"])
    run_experiment(make_experiment(cfg, progress=False))
    for name in OUTPUTS:
        assert (second[0] / name).read_bytes() == (direct / name).read_bytes(), name
    for name in TENSOR_FILES:
        same_scores_file(second[0] / name, direct / name)
