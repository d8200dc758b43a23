"""benchmarks/video_stage_budget.py: the sweep's table and plot come from the results file, and a missing file is a
clear error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "video_stage_budget.py"


def _run(frames: int, steps: int, wall_s: float, test: float, oot: float, direction: tuple[float, float]) -> dict:
    return {"video_num_frames": frames, "steps": steps, "video_share": 0.5, "lr": 5e-4, "video_samples": steps * 4,
            "stage_wall_s": wall_s,
            "test": {"video_visual_qa": test, "by_template": {"move_beeps": direction[0]}},
            "oot": {"video_visual_qa": oot, "by_template": {"move_beeps": direction[1]}}}


def test_table_and_plot(tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"runs": {"a": _run(6, 60, 204.0, 0.66, 0.48, (0.42, 0.27)),
                                            "b": _run(3, 200, 434.0, 0.84, 0.54, (0.70, 0.36))}}))
    plot = tmp_path / "plot.png"
    out = subprocess.run([sys.executable, str(SCRIPT), "--results", str(results), "--plot", str(plot)],
                         capture_output=True, text=True, check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("| a ") or line.startswith("| b ")]
    assert rows == ["| a | 6 | 60 | 50%, 0.0005 | 240 | 3.4 | 66% | 48% | 42% / 27% |",
                    "| b | 3 | 200 | 50%, 0.0005 | 800 | 7.2 | 84% | 54% | 70% / 36% |"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp.png"))


def test_missing_results_file(tmp_path):
    missing = tmp_path / "nope.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--results", str(missing), "--plot", str(tmp_path / "p.png")],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and f"{missing}: no such results file" in proc.stderr
    assert not (tmp_path / "p.png").exists()
