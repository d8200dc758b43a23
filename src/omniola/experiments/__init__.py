"""Experiments on the tiny omni world as committed commands: `omniola experiment NAME`.

An experiment trains several arms (a recipe plus overrides, one run per seed) under the same step budget,
evaluates every final model on the tiny world's test split, and writes a Markdown report with figures:

    omniola experiment --list
    omniola experiment progressive-vs-mixing --scale 0.2      # Ola Figure 3 on the tiny world, 3 seeds
    omniola experiment connectors                            # ola_pooling vs mlp2x_gelu vs qformer vs upm
    omniola experiment cross-modal-data                      # tiny with and without the video-audio bridge data

See docs/experiments.md.
"""

from .budget import distribute_steps, scaled_total
from .definitions import EXPERIMENTS, Arm, Experiment, apply_overrides, budget_stages, get_experiment
from .report import normalise, write_report
from .runner import plan, run_experiment

__all__ = [
    "EXPERIMENTS",
    "Arm",
    "Experiment",
    "apply_overrides",
    "budget_stages",
    "distribute_steps",
    "get_experiment",
    "normalise",
    "plan",
    "run_experiment",
    "scaled_total",
    "write_report",
]
