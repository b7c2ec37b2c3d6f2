"""`superweight run`: the experiment, wired to its edge (W&B tracker, out_dir files) and the sweep env."""

from __future__ import annotations

import contextlib
import os
import signal
import sys

from ..arguments import parse_command
from ..config import RunConfig
from ..experiment import Experiment, Result
from ..outputs import RunOutputs
from ..progress import now
from ..results import summary_table
from ..sweep import agent_param_names, apply_sweep_env, check_param_names
from ..tracking import Preempted, WandbTracker
from .base import register


@contextlib.contextmanager
def sigterm_raises():
    """SIGTERM (wandb agent stopping a run, a VM being preempted, `kill`) raises Preempted in the main thread,
    so the run finishes its W&B record (failed, or preempting with wandb.requeue_on_sigterm) and exits 143."""
    def handler(signum, frame):
        raise Preempted()

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (tests): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def make_experiment(cfg: RunConfig, progress: bool = True) -> Experiment:
    """An Experiment wired as `superweight run` wires it: the sweep environment applied (out_dir, group),
    a WandbTracker and the out_dir files as its sink."""
    apply_sweep_env(cfg)
    return Experiment(cfg, progress=progress, tracker=WandbTracker(cfg, cfg.out_dir), sink=RunOutputs(cfg.out_dir))


def run_experiment(exp: Experiment) -> Result:
    """Run it and mark it finished (the record `superweight sweep` checks) once W&B has its final state."""
    with sigterm_raises():
        result = exp.run()
    exp.log.record(("finished",), {"at": now()})
    return result


@register("run", usage="usage: superweight run [key=value | --key value ...] [config=FILE.yaml]")
def main(argv: list[str]) -> int:
    """Score every eligible weight with each metric, select Top-K and the controls at each K, perturb, evaluate
    and restore; write out_dir and log the W&B run. Rerunning the same command resumes."""
    _, cfg = parse_command(list(argv))
    if os.environ.get("WANDB_SWEEP_ID"):  # started by wandb agent (or a local sweep run exactly like it)
        check_param_names(agent_param_names(), "wandb agent")
    exp = make_experiment(cfg)
    try:
        result = run_experiment(exp)
    except Preempted:
        how = "marked preempting (W&B requeues it)" if cfg.wandb.requeue_on_sigterm else "stopped"
        print(f"superweight: SIGTERM: run {how}; rerun the same command to resume", file=sys.stderr)
        return 143
    print(summary_table(result.table, result.gaps))
    print(f"outputs: {exp.out.resolve()}")
    return 0
