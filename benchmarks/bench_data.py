"""Training-data throughput with and without the frozen-encoder feature cache, per tiny-world record kind.

    .venv/bin/python benchmarks/bench_data.py [--data ~/.cache/omniola/data/tiny] [--model ~/.cache/omniola/models/tiny]
        [--records-per-kind 64] [--batch-size 8] [--modalities audio image video] [--cache-dir DIR]
        [--threads 1]

For each record kind of the tiny omni world (the first --records-per-kind train records of that kind), in one process
with one torch thread (--threads; a DataLoader worker's setting), no DataLoader workers, encoders on the CPU:
  fill_s      `EncoderFeatureCache.fill` over those records (one-off; into a fresh temporary cache unless --cache-dir)
  uncached    records/s through `OlaDataset` (decode + processor) + `OlaCollator` + the frozen encoders' forward on
              each batch (vision tower on images / video frames, audio encoder on the chunks): what a training step
              spends before the connectors without a cache
  cached      records/s through `OlaDataset(transform=cache)` + `OlaCollator` + the encoders of modalities not cached
              (--modalities): media are still decoded and processed, the cached encoders' outputs are read from the
              cache (sha256 of the inputs, memory-mapped shard, checksum)
The two passes alternate batch by batch (uncached first on even batches), so load from other processes hits both
alike; the speed-up is also given in process CPU time, which such load moves less. The summary is the speed-up for
one epoch over the audio-bearing kinds (asr, audio_qa, image_speech_qa, video_audio_qa, video_cross_qa): total
uncached seconds / total cached seconds (target >= 3). Fill runs first, so media files are in the page cache for both
timed passes. Writes benchmarks/results/bench_data.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from omniola.inference import default_model_dir, omniola_home

ROOT = Path(__file__).resolve().parents[1]
AUDIO_KINDS = ["asr", "audio_qa", "image_speech_qa", "video_audio_qa", "video_cross_qa"]
TARGET_SPEEDUP = 3.0


def _encode(model, batch) -> None:
    """The frozen encoders' forward on a collated batch, as `OlaModel.embed_multimodal` runs them."""
    import torch

    inner = model.model
    if "pixel_values" in batch:
        inner.vision_tower(batch["pixel_values"], batch["image_grid_hw"])
    if "pixel_values_videos" in batch:
        grids = torch.tensor([[h, w] for t, h, w in batch["video_grid_thw"].tolist() for _ in range(t)])
        inner.vision_tower(batch["pixel_values_videos"], grids)
    if "input_features" in batch:
        inner.audio_encoder(batch["input_features"], batch.get("feature_attention_mask"), batch.get("audio_values"),
                            batch.get("audio_values_mask"))


def _batch(dataset, positions, collate, model) -> tuple[float, float]:
    """(wall s, process CPU s) to load, collate and encode the records at `positions` (media left in the batch)."""
    import torch

    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        _encode(model, collate([dataset[k] for k in positions]))
    return time.perf_counter() - wall, time.process_time() - cpu


def _epochs(raw, cached, n: int, batch_size: int, collate, model) -> dict[str, float]:
    """One epoch each way over records 0..n-1, batch by batch in alternating order, so both see the same load."""
    totals = dict.fromkeys(["uncached_s", "uncached_cpu_s", "cached_s", "cached_cpu_s"], 0.0)
    for b, first in enumerate(range(0, n, batch_size)):
        positions = range(first, min(first + batch_size, n))
        runs = [("uncached", raw), ("cached", cached)]
        for name, dataset in runs if b % 2 == 0 else runs[::-1]:
            wall, cpu = _batch(dataset, positions, collate, model)  # cached: only encoders the cache does not cover
            totals[f"{name}_s"] += wall
            totals[f"{name}_cpu_s"] += cpu
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=omniola_home() / "data" / "tiny",
                        help="a built tiny omni world (omniola data tiny --scale full)")
    parser.add_argument("--model", type=Path, default=default_model_dir(), help="an omniola model directory")
    parser.add_argument("--split", default="train")
    parser.add_argument("--records-per-kind", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--modalities", nargs="+", default=["audio", "image", "video"],
                        help="encoders cached (image and video share the vision tower)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="reuse this cache (default: a fresh temp dir)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: as in a DataLoader worker, and steady on a loaded machine)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/bench_data.json")
    args = parser.parse_args()

    import torch

    from omniola.data import EncoderFeatureCache, OlaCollator, OlaDataset
    from omniola.data.tiny_world import tiny_world_files
    from omniola.inference import load_model

    torch.set_num_threads(args.threads)
    model, processor = load_model(args.model, device="cpu")
    collate = OlaCollator(processor.tokenizer.pad_token_id)
    tmp = None
    if args.cache_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="omniola-feature-cache-")
        args.cache_dir = Path(tmp.name)
    t = time.perf_counter()
    cache = EncoderFeatureCache(args.cache_dir, model, args.modalities)
    fingerprint_s = time.perf_counter() - t

    manifest = json.loads((args.data / "manifest.json").read_text())
    rows = []
    for kind in manifest["files"][args.split]:
        (path,) = tiny_world_files(args.data, args.split, [kind])
        raw = OlaDataset(path, None, processor)
        cached = OlaDataset(path, None, processor, transform=cache)
        n = min(args.records_per_kind, len(raw))
        t = time.perf_counter()
        filled = cache.fill(torch.utils.data.Subset(raw, range(n)), progress=False)
        fill_s = time.perf_counter() - t
        misses = cache.stats["misses"]
        times = _epochs(raw, cached, n, args.batch_size, collate, model)
        assert cache.stats["misses"] == misses, "the cached pass missed entries that fill should have written"
        rows.append({"kind": kind, "records": n, "fill_s": fill_s, "entries_computed": filled["computed"], **times,
                     "uncached_rps": n / times["uncached_s"], "cached_rps": n / times["cached_s"],
                     "speedup": times["uncached_s"] / times["cached_s"],
                     "cpu_speedup": times["uncached_cpu_s"] / times["cached_cpu_s"]})
        print(f"  measured {kind}", file=sys.stderr)

    header = (f"{'kind':<17} {'records':>7} {'fill s':>7} {'uncached rec/s':>15} {'cached rec/s':>13} "
              f"{'speed-up':>9} {'CPU-time speed-up':>18}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['kind']:<17} {r['records']:>7} {r['fill_s']:>7.2f} {r['uncached_rps']:>15.1f} "
              f"{r['cached_rps']:>13.1f} {r['speedup']:>8.2f}x {r['cpu_speedup']:>17.2f}x")
    audio = [r for r in rows if r["kind"] in AUDIO_KINDS]
    summary = {
        "audio_epoch_records": sum(r["records"] for r in audio),
        "audio_epoch_uncached_s": sum(r["uncached_s"] for r in audio),
        "audio_epoch_cached_s": sum(r["cached_s"] for r in audio),
        "audio_epoch_uncached_cpu_s": sum(r["uncached_cpu_s"] for r in audio),
        "audio_epoch_cached_cpu_s": sum(r["cached_cpu_s"] for r in audio),
        "fingerprint_s": fingerprint_s,
        "cache_bytes": sum(p.stat().st_size for p in args.cache_dir.rglob("*.safetensors")),
    }
    summary["audio_epoch_speedup"] = summary["audio_epoch_uncached_s"] / summary["audio_epoch_cached_s"]
    summary["audio_epoch_cpu_speedup"] = summary["audio_epoch_uncached_cpu_s"] / summary["audio_epoch_cached_cpu_s"]
    print(f"\nepoch of the audio-bearing kinds ({summary['audio_epoch_records']} records): "
          f"{summary['audio_epoch_uncached_s']:.1f} s uncached, {summary['audio_epoch_cached_s']:.1f} s cached: "
          f"{summary['audio_epoch_speedup']:.2f}x wall, {summary['audio_epoch_cpu_speedup']:.2f}x CPU time "
          f"(target >= {TARGET_SPEEDUP:.0f}x)")
    print(f"cache on disk {summary['cache_bytes'] / 2**20:.0f} MiB; encoder fingerprints took {fingerprint_s:.2f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "model": str(args.model), "data": str(args.data),
            "split": args.split, "records_per_kind": args.records_per_kind, "batch_size": args.batch_size,
            "modalities": args.modalities}
    args.out.write_text(json.dumps({"meta": meta, "summary": summary, "target_speedup": TARGET_SPEEDUP,
                                    "kinds": rows}, indent=2))
    print(f"wrote {args.out}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
