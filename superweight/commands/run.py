"""`superweight run`: the experiment, wired to its edge (W&B tracker, out_dir files) and the sweep env."""

from __future__ import annotations

import contextlib
import os
import signal
import sys

from ..arguments import parse_command
from ..config import RunConfig
from ..run.experiment import Experiment, Result
from ..edge.outputs import RunOutputs
from ..run.resume import now
from ..core.comparison import comparison_text
from ..core.summary import summary_table
from ..edge.sweep import apply_sweep_env, check_agent_run
from ..edge.signals import Preempted, interrupt, shielded
from ..edge.tracking import TrackingError, WandbTracker
from .base import register


@contextlib.contextmanager
def signals_raise():
    """SIGTERM (wandb agent stopping a run, a VM being preempted, `kill`) raises Preempted and SIGINT (Ctrl-C,
    or W&B's own stop of a run from the UI) KeyboardInterrupt in the main thread, never inside a W&B call
    (signals.interrupt), so the run closes its W&B record (preempting with wandb.requeue_on_sigterm, else
    stopped) and exits 143 / 130. A second SIGTERM while the run closes is ignored."""
    state = {"term": False}

    def on_term(signum, frame):
        if not state["term"]:
            state["term"] = True
            interrupt(Preempted())

    def on_int(signum, frame):
        interrupt(KeyboardInterrupt())

    try:
        old = {s: signal.signal(s, h) for s, h in ((signal.SIGTERM, on_term), (signal.SIGINT, on_int))}
    except ValueError:  # not the main thread (tests): leave signals alone
        yield
        return
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def make_experiment(cfg: RunConfig, progress: bool = True) -> Experiment:
    """An Experiment wired as `superweight run` wires it: the sweep environment applied (out_dir, group),
    a WandbTracker and the out_dir files as its sink."""
    apply_sweep_env(cfg)
    return Experiment(cfg, progress=progress, tracker=WandbTracker(cfg, cfg.out_dir), sink=RunOutputs(cfg.out_dir))


def run_experiment(exp: Experiment) -> Result:
    """Run it and mark it finished (the record `superweight sweep` checks) once W&B has its final state.
    A SIGTERM/SIGINT that arrives after the W&B run finished changes nothing: the run is complete, the progress
    log says finished, and the command says so and exits 0."""
    late = None
    with signals_raise():
        result = exp.run()
        try:
            with shielded():
                exp.log.record(("finished",), {"at": now()})
        except (Preempted, KeyboardInterrupt) as e:
            late = "SIGTERM" if isinstance(e, Preempted) else "SIGINT"
    late = late or getattr(exp.tracker, "late_signal", None)
    if late:
        print(f"superweight: {late} arrived after the run had finished and was published; nothing to resume or "
              "requeue (exit 0)", file=sys.stderr)
    return result


def _rows_done(exp: Experiment) -> str:
    log = getattr(exp, "log", None)
    if log is None:
        return "before the first row"
    done = sum(1 for k in log.done if k and k[0] == "row")
    return f"after {done}/{exp.n_rows()} rows"


@register("run", usage="usage: superweight run [key=value | --key value ...] [config=FILE.yaml]")
def main(argv: list[str]) -> int:
    """Score every eligible weight with each metric, select Top-K and the controls at each K, perturb, evaluate
    and restore; write out_dir and log the W&B run. Rerunning the same command resumes."""
    _, cfg = parse_command(list(argv))
    if os.environ.get("WANDB_SWEEP_PARAM_PATH"):  # started by wandb agent (or a local sweep run exactly like it)
        check_agent_run(cfg)
    exp = make_experiment(cfg)
    try:
        result = run_experiment(exp)
    except Preempted:
        how = ("marked preempting, W&B requeues it" if getattr(exp.tracker, "marked_preempting", False)
               else "stopped, not requeued")
        print(f"superweight: SIGTERM {_rows_done(exp)}: run {how}; rerun the same command to resume "
              f"(out_dir {cfg.out_dir})", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"superweight: interrupted {_rows_done(exp)}; rerun the same command to resume (out_dir {cfg.out_dir})",
              file=sys.stderr)
        return 130
    except TrackingError as e:
        print(f"superweight: W&B error: {e}; the rows so far are in {cfg.out_dir} (rerun the same command to "
              "resume and publish again, or set wandb.mode=offline / wandb.mode=disabled)", file=sys.stderr)
        return 1
    print(summary_table(result.table, result.gaps))
    if getattr(exp.sink, "comparison", None) is not None:
        print("\n" + comparison_text(exp.sink.comparison))
    print(f"outputs: {exp.out.resolve()}")
    return 0
