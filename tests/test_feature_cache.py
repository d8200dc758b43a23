"""The frozen-encoder feature cache: bit-identical hits, invalidation, reuse, workers, concurrency, corruption."""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from omniola.data import EncoderFeatureCache, FeatureCacheMiss, OlaCollator, OlaDataset
from omniola.data.tiny_world import write_video, write_wav
from omniola.errors import ConfigError

from conftest import tone, turns

ALL = ("audio", "image", "video")


RECORDS = [
    {"id": "image", "image": "shape.png", "conversations": turns("<image>\nWhat shape?", "square")},
    {"id": "asr", "audio": "a.wav", "conversations": turns("<speech>\nTranscribe the audio.", "a tone")},
    {"id": "asr_same_audio", "audio": "a.wav", "conversations": turns("<speech>\nHow many beeps?", "1")},
    {"id": "audio_b", "audio": "b.wav", "conversations": turns("<speech>\nHigh or low?", "high")},
    {"id": "image_audio_q", "image": "shape.png", "audio_q": "a.wav",
     "text_q": "<image>\nUser's question in speech: <speech>",
     "conversations": turns("<image>\nUser's question in speech: <speech>", "red")},
    {"id": "video_audio", "video": "clip.mp4", "audio": "clip.wav",
     "conversations": turns("<speech><image>\nHow many beeps?", "1")},
    {"id": "video", "video": "clip.mp4", "conversations": turns("<image>\nWhich way?", "right")},
    {"id": "text", "conversations": turns("Say yes.", "yes")},
]


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("media")
    image = Image.new("RGB", (40, 24), "white")
    image.paste((255, 0, 0), (4, 4, 20, 20))
    image.save(root / "shape.png")
    write_wav(root / "a.wav", tone(1.2, 440.0))
    write_wav(root / "b.wav", tone(0.7, 660.0))
    frames = np.zeros((6, 32, 32, 3), np.uint8)
    for k in range(6):
        frames[k, 8:24, 4 + 3 * k : 12 + 3 * k] = (0, 0, 255)
    track = tone(1.5, 880.0)
    write_video(root / "clip.mp4", frames, 4, track)
    write_wav(root / "clip.wav", track)
    (root / "records.json").write_text(json.dumps(RECORDS))
    return root


def _dataset(media: Path, processor, records: list[dict] | None = None, **kwargs) -> OlaDataset:
    path = media / "records.json"
    if records is not None:
        path = media / f"records_{abs(hash(json.dumps(records)))}.json"
        path.write_text(json.dumps(records))
    return OlaDataset(path, media, processor, **kwargs)


def _fresh_items(model, sample) -> dict[str, list[torch.Tensor]]:
    """The encoders on each item of a raw sample alone: what a cache hit must equal bit for bit."""
    inner, out = model.model, {}
    with torch.no_grad():
        if "input_features" in sample:
            feats, mask = sample["input_features"], sample["feature_attention_mask"]
            out["audio"] = [
                inner.audio_encoder(feats[i : i + 1, :, : int(mask[i].sum())],
                                    torch.ones(1, int(mask[i].sum()), dtype=torch.long))[0]
                for i in range(feats.shape[0])
            ]
        for key, grid_key in (("pixel_values", "image_grid_hw"), ("pixel_values_videos", "video_grid_thw")):
            if key not in sample:
                continue
            grids = sample[grid_key].tolist()
            if grid_key == "video_grid_thw":
                grids = [[h, w] for t, h, w in grids for _ in range(t)]
            views = sample[key].split([h * w for h, w in grids])
            out[key] = [inner.vision_tower(v, torch.tensor([g]))[0] for v, g in zip(views, grids)]
    return out


# ------------------------------------------------------------------------------------------------ hits
def test_hit_is_bit_identical_to_the_encoders_output(micro, media, tmp_path):
    model, processor = micro
    cache = EncoderFeatureCache(tmp_path / "cache", model, ALL)
    raw = _dataset(media, processor)
    counts = cache.fill(raw, batch_size=4, progress=False)
    # a.wav appears in three records, shape.png in two: one entry each
    assert counts["samples"] == len(RECORDS) and counts["computed"] < counts["items"]
    assert cache.fill(raw, progress=False)["computed"] == 0

    cached = _dataset(media, processor, transform=cache)
    again = cache.fill(torch.utils.data.Subset(cached, range(3)), progress=False)  # the transform is bypassed
    assert again["items"] == 4 and again["computed"] == 0  # two image views, a.wav twice
    for k in range(len(RECORDS)):
        sample, hit = raw[k], cached[k]
        fresh = _fresh_items(model, sample)
        assert not {"input_features", "feature_attention_mask", "pixel_values", "pixel_values_videos"} & set(hit)
        for key in ("input_ids", "labels", "attention_mask", "image_grid_hw", "video_grid_thw", "audio_num_chunks"):
            assert (key in hit) == (key in sample) and (key not in hit or torch.equal(hit[key], sample[key]))
        if "audio" in fresh:
            assert torch.equal(hit["audio_encoder_states"], torch.cat(fresh["audio"]))
            assert hit["audio_encoder_lengths"].tolist() == [f.shape[0] for f in fresh["audio"]]
        if "pixel_values" in fresh:
            assert torch.equal(hit["image_tower_states"], torch.cat(fresh["pixel_values"]))
        if "pixel_values_videos" in fresh:
            assert torch.equal(hit["video_tower_states"], torch.cat(fresh["pixel_values_videos"]))
    assert cache.stats["misses"] == 0 and cache.stats["hits"] > 0
    assert cache.num_entries() == counts["computed"]


def test_cached_batches_give_the_same_logits(micro, media, tmp_path):
    model, processor = micro
    cache = EncoderFeatureCache(tmp_path / "cache", model, ALL)
    raw = _dataset(media, processor)
    cache.fill(raw, progress=False)
    cached = _dataset(media, processor, transform=cache)
    collate = OlaCollator(processor.tokenizer.pad_token_id)
    with torch.no_grad():
        # One sample per batch: the uncached path runs each audio chunk and image view alone, exactly as the cache
        # computed it, so the logits are bit-identical. (Video frames are batched by the tower; batching does not
        # change the vision tower's bits on CPU, which `fill` checks too.)
        for k in range(len(RECORDS)):
            uncached = model(**collate([raw[k]])).logits
            assert torch.equal(model(**collate([cached[k]])).logits, uncached), RECORDS[k]["id"]
        # A mixed batch: uncached, the batch's audio chunks are zero-padded to a common length and encoded together
        # (masked attention), which rounds differently from each chunk alone; equal up to float32 rounding.
        both = [collate([raw[k] for k in range(len(RECORDS))]), collate([cached[k] for k in range(len(RECORDS))])]
        torch.testing.assert_close(model(**both[1]).logits, model(**both[0]).logits, atol=1e-6, rtol=1e-6)


def test_a_miss_is_computed_on_the_spot_and_stored(micro, media, tmp_path):
    model, processor = micro
    cache = EncoderFeatureCache(tmp_path / "cache", model, ("audio",))
    raw, cached = _dataset(media, processor), _dataset(media, processor, transform=cache)
    hit = cached[1]
    assert cache.stats["computed"] == 1 and "pixel_values" not in raw[1]
    assert torch.equal(hit["audio_encoder_states"], torch.cat(_fresh_items(model, raw[1])["audio"]))
    assert "pixel_values" in cached[0]  # image not cached: left as it is
    # a pickled cache (a spawned worker) has no encoder: a miss is a clear error, never a skipped record
    remote = pickle.loads(pickle.dumps(cache))
    assert torch.equal(remote(raw[1])["audio_encoder_states"], hit["audio_encoder_states"])
    with pytest.raises(FeatureCacheMiss, match="fill"):
        _dataset(media, processor, transform=remote)[3]


# ------------------------------------------------------------------------------------------------ invalidation
def test_changing_an_encoder_weight_invalidates(micro, media, tmp_path):
    model, processor = micro
    root = tmp_path / "cache"
    cache = EncoderFeatureCache(root, model, ALL)
    raw = _dataset(media, processor)
    cache.fill(raw, progress=False)
    old_dir, vision_dir = cache.directory("audio"), cache.directory("image")
    old_files = sorted(old_dir.glob("*.safetensors"))
    with torch.no_grad():
        model.model.audio_encoder.whisper.layers[0].fc1.weight[0, 0] += 0.5
    with pytest.raises(ConfigError, match="weights changed"):
        cache(raw[1])

    fresh = EncoderFeatureCache(root, model, ALL)
    assert fresh.directory("audio") != old_dir and fresh.directory("image") == vision_dir
    counts = fresh.fill(raw, progress=False)
    n_audio = sum(s["input_features"].shape[0] for s in (raw[k] for k in range(len(RECORDS))) if "input_features" in s)
    assert counts["computed"] == 3 and n_audio == 5  # a.wav, b.wav, clip.wav: recomputed; vision: all hits
    assert sorted(old_dir.glob("*.safetensors")) == old_files  # old entries kept, never served to the new encoder
    hit = _dataset(media, processor, transform=fresh)[1]
    assert torch.equal(hit["audio_encoder_states"], torch.cat(_fresh_items(model, raw[1])["audio"]))


def test_a_second_stage_reuses_the_first_stages_entries(micro, media, tmp_path):
    model, processor = micro
    root = tmp_path / "cache"
    stage1 = _dataset(media, processor, [RECORDS[1], RECORDS[3]])  # audio only
    first = EncoderFeatureCache(root, model, ("audio", "image")).fill(stage1, progress=False)
    assert first["computed"] == 2
    # a new run: another cache object and dataset over other records holding the same media
    stage2 = _dataset(media, processor, [RECORDS[0], RECORDS[2], RECORDS[4], RECORDS[3]])
    cache = EncoderFeatureCache(root, model, ("audio", "image"))
    counts = cache.fill(stage2, progress=False)
    assert counts["computed"] == 2  # the image's two views; a.wav and b.wav hit
    assert counts["cached"] == 3 + 2  # a.wav twice + b.wav, and shape.png's views again in image_audio_q
    batch = OlaCollator(processor.tokenizer.pad_token_id)(
        [_dataset(media, processor, [RECORDS[0], RECORDS[2], RECORDS[4], RECORDS[3]], transform=cache)[k]
         for k in range(4)])
    assert batch["audio_encoder_lengths"].shape == (3,) and batch["image_grid_hw"].shape == (4, 2)
    assert cache.stats["misses"] == 0


# ------------------------------------------------------------------------------------------------ processes
def test_dataloader_with_two_workers(micro, media, tmp_path):
    model, processor = micro
    cache = EncoderFeatureCache(tmp_path / "cache", model, ALL)
    cache.fill(_dataset(media, processor), progress=False)
    ds = _dataset(media, processor, transform=cache)
    collate = OlaCollator(processor.tokenizer.pad_token_id)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate)
    batches = list(loader)
    expected = [collate([ds[k] for k in range(i, min(i + 3, len(ds)))]) for i in range(0, len(ds), 3)]
    assert len(batches) == len(expected)
    for got, want in zip(batches, expected):
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)


_FILL_SCRIPT = textwrap.dedent("""
    import os, sys, time
    import torch
    torch.set_num_threads(1)
    from omniola.data import EncoderFeatureCache, OlaDataset
    from omniola.inference import load_model
    model_dir, records, media, root, sync = sys.argv[1:6]
    model, processor = load_model(model_dir, device="cpu")
    cache = EncoderFeatureCache(root, model, ("audio", "image", "video"), shard_mb=0.0001)  # a shard per batch
    dataset = OlaDataset(records, media, processor)
    open(os.path.join(sync, f"ready-{os.getpid()}"), "w").close()
    while not os.path.exists(os.path.join(sync, "go")):  # both writers start together
        time.sleep(0.01)
    print(cache.fill(dataset, batch_size=2, progress=False))
""")


def test_concurrent_fills_leave_a_readable_cache(micro_dir, media, tmp_path):
    from omniola.inference import load_model

    root, sync = tmp_path / "cache", tmp_path / "sync"
    sync.mkdir()
    args = [sys.executable, "-c", _FILL_SCRIPT, str(micro_dir), str(media / "records.json"), str(media), str(root),
            str(sync)]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    deadline = time.monotonic() + 240
    while len(list(sync.glob("ready-*"))) < 2 and all(p.poll() is None for p in procs):
        assert time.monotonic() < deadline, "writers did not start"
        time.sleep(0.05)
    (sync / "go").touch()
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    model, processor = load_model(micro_dir, device="cpu")
    cache = EncoderFeatureCache(root, model, ALL)
    assert not list(root.rglob(".*.tmp"))
    shards = list(cache.directory("audio").glob("*.safetensors"))
    assert len({s.name.split("-")[2] for s in shards}) == 2  # both writers wrote (the same entries, in their shards)
    raw = _dataset(media, processor)
    cached = _dataset(media, processor, transform=cache)
    for k in range(len(RECORDS)):
        hit, fresh = cached[k], _fresh_items(model, raw[k])
        if "audio" in fresh:
            assert torch.equal(hit["audio_encoder_states"], torch.cat(fresh["audio"]))
        if "pixel_values_videos" in fresh:
            assert torch.equal(hit["video_tower_states"], torch.cat(fresh["pixel_values_videos"]))
    assert cache.stats["misses"] == 0


_KILLED_FILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from omniola.data import EncoderFeatureCache, OlaDataset
    from omniola.inference import load_model
    model_dir, records, media, root = sys.argv[1:5]
    model, processor = load_model(model_dir, device="cpu")
    cache = EncoderFeatureCache(root, model, ("audio",), shard_mb=0.0001)  # a shard per batch
    replace, shards = os.replace, []

    def replace_then_die(src, dst):  # SIGKILL with the second shard written but not yet renamed into place
        if str(src).endswith(".safetensors.tmp"):
            shards.append(src)
            if len(shards) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        replace(src, dst)

    os.replace = replace_then_die
    cache.fill(OlaDataset(records, media, processor), batch_size=1, progress=False)
""")


def test_a_fill_killed_mid_shard_keeps_its_shards_and_the_next_fill_completes(micro_dir, media, tmp_path):
    from omniola.inference import load_model

    root = tmp_path / "cache"
    killed = subprocess.run([sys.executable, "-c", _KILLED_FILL_SCRIPT, str(micro_dir), str(media / "records.json"),
                             str(media), str(root)], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    (folder,) = root.glob("audio-*")
    assert len(list(folder.glob("*.safetensors"))) == 1 and len(list(folder.glob(".*.safetensors.tmp"))) == 1

    model, processor = load_model(micro_dir, device="cpu")
    cache = EncoderFeatureCache(root, model, ("audio",))
    counts = cache.fill(_dataset(media, processor), progress=False)
    assert counts["computed"] == 2  # of a.wav, b.wav and clip.wav, the first shard's entry is kept
    assert not list(folder.glob(".*.tmp"))  # the killed writer's temporary file is gone
    raw, cached = _dataset(media, processor), _dataset(media, processor, transform=cache)
    for k in range(len(RECORDS)):
        if "input_features" in raw[k]:
            assert torch.equal(cached[k]["audio_encoder_states"], torch.cat(_fresh_items(model, raw[k])["audio"]))
    assert cache.stats["misses"] == 0


def test_only_temporary_files_of_writers_that_stopped_are_deleted(micro, tmp_path):
    import socket

    model, _ = micro
    cache = EncoderFeatureCache(tmp_path, model, ("audio",))
    folder = cache.directory("audio")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    names = {"dead": f".1a2b-{host}-{gone.stdout.strip()}-0123abcd.safetensors.tmp",
             "alive": f".1a2b-{host}-{os.getpid()}-0123abcd.safetensors.tmp",
             "other_host": f".1a2b-not-{host}-{gone.stdout.strip()}-0123abcd.safetensors.tmp",
             "unparsable": ".no-pid.safetensors.tmp"}
    for name in names.values():
        (folder / name).write_bytes(b"partial")
    cache.fill([], progress=False)
    assert sorted(p.name for p in folder.glob(".*.tmp")) == sorted(v for k, v in names.items() if k != "dead")


# ------------------------------------------------------------------------------------------------ corruption
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_corrupt_shard_is_ignored_and_recomputed(micro, media, tmp_path, caplog, damage):
    model, processor = micro
    root = tmp_path / "cache"
    EncoderFeatureCache(root, model, ("audio",)).fill(_dataset(media, processor), progress=False)
    cache = EncoderFeatureCache(root, model, ("audio",))
    (shard,) = cache.directory("audio").glob("*.safetensors")
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 100]
    else:
        data[-50:-40] = bytes(10)  # inside the last tensor's bytes
    shard.write_bytes(bytes(data))

    raw, cached = _dataset(media, processor), _dataset(media, processor, transform=cache)
    with caplog.at_level(logging.WARNING, logger="omniola.data.feature_cache"):
        hits = [cached[k] for k in range(len(RECORDS))]
    assert ("unreadable shard" if damage == "truncate" else "fails its checksum") in caplog.text
    for k, hit in enumerate(hits):
        if "input_features" in raw[k]:
            assert torch.equal(hit["audio_encoder_states"], torch.cat(_fresh_items(model, raw[k])["audio"]))
    assert cache.stats["computed"] >= 1
    if damage == "truncate":
        assert cache.stats["computed"] == 3  # nothing of the truncated shard is served: a.wav, b.wav, clip.wav again


def test_bad_arguments(micro, tmp_path):
    model, _ = micro
    with pytest.raises(ConfigError, match="subset"):
        EncoderFeatureCache(tmp_path, model, ("speech",))
    model.model.audio_encoder = None
    with pytest.raises(ConfigError, match="no audio encoder"):
        EncoderFeatureCache(tmp_path, model, ("audio",))
