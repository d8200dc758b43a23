"""Plot and tabulate the video stage's budget sweep: video QA about the frames against the stage's training time.

    .venv/bin/python benchmarks/video_stage_budget.py [--results benchmarks/results/video_stage_budget.json]
        [--plot docs/video-stage-budget.png]

The results file holds one run per arm (frames kept per clip, steps, data mixture, learning rate), each a single
video stage trained from the same grounded image-stage checkpoint and scored with `omniola eval --task tiny --kinds
video_visual_qa` on the test and out-of-template splits; the file's `stage` and `command` fields say how
(docs/training.md, "What the frames cost").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def table(runs: dict) -> str:
    rows = ["| arm | frames | steps | video share, lr | video questions seen | stage minutes | test | oot "
            "| direction, test / oot |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for arm, r in runs.items():
        rows.append(f"| {arm} | {r['video_num_frames']} | {r['steps']} | {100 * r['video_share']:.0f}%, {r['lr']:g} | "
                    f"{r['video_samples']} | "
                    f"{r['stage_wall_s'] / 60:.1f} | {100 * r['test']['video_visual_qa']:.0f}% | "
                    f"{100 * r['oot']['video_visual_qa']:.0f}% | {100 * r['test']['by_template']['move_beeps']:.0f}% / "
                    f"{100 * r['oot']['by_template']['move_beeps']:.0f}% |")
    return "\n".join(rows)


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from omniola.training.trainer import save_figure  # imports torch: only when there is something to plot

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    panels = ((axes[0], lambda r: r["stage_wall_s"] / 60, "video stage, minutes on 2 CPU cores",
               lambda r, split: 100 * r[split]["video_visual_qa"], "video QA about the frames, %"),
              (axes[1], lambda r: r["video_samples"], "video questions trained on",
               lambda r, split: 100 * r[split]["by_template"]["move_beeps"], "direction questions right, % (chance 25)"))
    for ax, x_of, x_label, y_of, y_label in panels:
        for split, fill in (("test", True), ("oot", False)):
            for frames, color in ((6, "tab:blue"), (3, "tab:orange")):
                chosen = {arm: r for arm, r in runs.items() if r["video_num_frames"] == frames}
                if not chosen:
                    continue
                xs, ys = [x_of(r) for r in chosen.values()], [y_of(r, split) for r in chosen.values()]
                ax.scatter(xs, ys, color=color if fill else "none", edgecolors=color,
                           label=f"{frames} frames, {'test' if fill else 'out of template'}")
                for x, y, arm in zip(xs, ys, chosen):
                    ax.annotate(arm, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axhline(80, color="grey", linewidth=0.8)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8)
    fig.suptitle("The video stage's budget: grounded visual tokens, LoRA alone (grey line: the 80 % target)",
                 fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, rect=(0, 0.06, 1, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "video_stage_budget.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "video-stage-budget.png")
    args = parser.parse_args()
    if not args.results.is_file():
        raise SystemExit(f"{args.results}: no such results file")
    runs = json.loads(args.results.read_text())["runs"]
    print(table(runs))
    plot(runs, args.plot)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
