"""Step budgets: scaling a recipe's optimizer steps while every arm of an experiment keeps the same total.

`--scale F` shrinks (or grows) an experiment's budget. The scaled total is computed once for the whole experiment,

    T = round_half_up(F * total)         # total: the arms' common number of LLM-stage steps (340, tiny recipes)

and then each arm's recipe spreads exactly T steps over its stages in proportion to their original steps (Hamilton's
largest-remainder method, every stage at least one step). A one-stage baseline gets all T steps; a five-stage
progressive recipe gets five parts that sum to T. Rounding each stage on its own would not do: with the previous
recipes' stages, 0.15 x (150, 150, 100, 120, 240) = (22.5, 22.5, 15, 18, 36) rounds to 115 steps (halves up) or 113
(halves to even), while the one-stage baselines got 0.15 x 760 = 114. A vision tower pretraining stage
(`objective: siglip`) is not part of the budget: every arm starts with the same one, run as written; nor is a CTC
pre-alignment of the speech connector (`objective: ctc`, no LLM forward pass), a step of the progressive order
(`definitions.budget_stages`).
"""

from __future__ import annotations

import math

from ..errors import ConfigError


def scaled_total(total: int, scale: float) -> int:
    """`scale * total` rounded half up (Python's `round` rounds halves to even: round(2.5) == 2)."""
    if not (scale > 0 and math.isfinite(scale)):
        raise ConfigError(f"--scale must be a positive number, got {scale!r}")
    return math.floor(scale * total + 0.5)


def distribute_steps(steps: list[int], total: int) -> list[int]:
    """Splits `total` steps over stages in proportion to `steps` (largest remainder; each stage >= 1).

    Each stage's quota is `total * steps[i] / sum(steps)`. Stages first get the whole part of their quota (at least
    one step); then, one step at a time, the stage furthest below its quota gains a step (the largest remainder;
    ties go to the earlier stage) or, when the minimum of one step pushed the sum over `total`, the stage furthest
    above its quota loses one. The result always sums to exactly `total`.

    Args:
        steps: The stages' original optimizer steps (positive).
        total: The steps to distribute (at least one per stage).

    Returns:
        The stages' new steps, in stage order, summing to `total`.

    Raises:
        ConfigError: `total` is smaller than the number of stages, or `steps` is empty or not positive.
    """
    if not steps or any(s <= 0 for s in steps):
        raise ConfigError(f"stage steps must be positive, got {steps}")
    if total < len(steps):
        raise ConfigError(f"{total} steps cannot give each of {len(steps)} stages a step; use a larger --scale")
    whole = sum(steps)
    quotas = [total * s / whole for s in steps]
    out = [max(1, math.floor(q)) for q in quotas]
    while sum(out) < total:
        i = max(range(len(out)), key=lambda k: (quotas[k] - out[k], -k))
        out[i] += 1
    while sum(out) > total:
        i = max((k for k in range(len(out)) if out[k] > 1), key=lambda k: (out[k] - quotas[k], -k))
        out[i] -= 1
    return out
