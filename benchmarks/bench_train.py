"""Training throughput of the shipped tiny recipes: samples/s per stage, whole-recipe wall time, peak RSS.

    .venv/bin/python benchmarks/bench_train.py [--steps 6] [--recipes tiny,tiny-direct-mix,tiny-balanced]
        [--modes off,cold,warm] [--attention auto]

Each recipe runs in a fresh subprocess (`omniola train`, so peak RSS is its own) with every stage cut to --steps
optimizer steps; `tiny` runs three times: feature cache off, cache cold (filled by this run: includes encoding),
cache warm (filled by the previous run: what later stages, seeds and experiments get). The whole-recipe wall time is
projected from the measured seconds per step of each stage times the recipe's real step counts, plus the measured
fixed cost (model build/load, cache fill, checkpoint writes). `--attention sdpa,eager` runs every recipe and mode once
per LLM attention kernel (the stages' `attention` field), one after the other, for a side-by-side ratio; a `warm`
mode without a `cold` one before it fills the cache first, untimed. Needs the tiny world (`omniola data tiny --scale
full`). Writes benchmarks/results/train.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cut_steps(recipe: Path, steps: int, cache: bool, out: Path, attention: str = "auto") -> Path:
    text = recipe.read_text()
    text = re.sub(r"(\n\s+)steps: \d+", rf"\1steps: {steps}", text)
    text = re.sub(r"(\n\s+)save_every: \d+", rf"\1save_every: {10 * steps}", text)
    fields = f"feature_cache: {str(cache).lower()}", f"attention: {attention}"
    if "\ndefaults:" in text:
        text = text.replace("\ndefaults:", "\ndefaults:" + "".join(f"\n  {f}" for f in fields), 1)
    else:  # single-stage baselines: put them in the stage
        text = re.sub(r"(\n    steps: \d+)", lambda m: m.group(1) + "".join(f"\n    {f}" for f in fields), text)
    path = out / f"{recipe.stem}-{attention}.yaml"
    path.write_text(text)
    return path


def run(recipe: Path, out: Path, cache_dir: Path) -> tuple[dict, float]:
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "omniola", "train", str(recipe), "--out", str(out), "--quiet",
           "--feature-cache", str(cache_dir)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text()), time.perf_counter() - start


def main() -> None:
    from omniola.training import load_recipe
    from omniola.training.recipe import packaged_recipe

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per stage")
    parser.add_argument("--recipes", default="tiny,tiny-direct-mix,tiny-balanced")
    parser.add_argument("--modes", default="off,cold,warm", help="feature-cache modes of `tiny` (others: off)")
    parser.add_argument("--attention", default="auto", help="LLM attention kernels to compare: auto, eager, sdpa")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    cache_dir = work / "feature_cache"
    rows = []
    filled = False  # the cache folder holds this run's encoder outputs (one world, one set of frozen encoders)
    for name in args.recipes.split(","):
        full = load_recipe(packaged_recipe(name))
        real_steps = {s.name: s.steps for s in full.stages}
        modes = [(m, m != "off") for m in args.modes.split(",")] if name == "tiny" else [("off", False)]
        for (mode, cache), attention in itertools.product(modes, args.attention.split(",")):
            recipe = cut_steps(packaged_recipe(name), args.steps, cache, work, attention)
            out = work / f"{name}-{mode}-{attention}"
            if mode == "warm" and not filled:
                run(recipe, work / "fill", cache_dir)  # untimed: what a cold run before it would have filled
            filled = filled or cache
            summary, wall = run(recipe, out, cache_dir)
            trained = sum(s["wall_s"] for s in summary["stages"])
            fixed = wall - trained
            projected = fixed + sum(s["wall_s"] / s["steps"] * real_steps[s["name"]] for s in summary["stages"])
            rows.append({
                "recipe": name, "feature_cache": mode, "attention": attention,
                "stages": {s["name"]: round(s["samples_per_s"], 2) for s in summary["stages"]},
                "measured_wall_s": round(wall, 1), "projected_full_wall_s": round(projected, 1),
                "peak_rss_mib": summary["peak_rss_mib"],
            })
            r = rows[-1]
            print(f"{name:16} cache {mode:4} attention {attention:5} | samples/s per stage {r['stages']} | run "
                  f"{wall:.0f} s | projected full recipe {projected / 60:.1f} min | peak RSS "
                  f"{r['peak_rss_mib']:.0f} MiB", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    report = {"steps_per_stage": args.steps, "threads": os.cpu_count(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
