"""Training data: Ola-format records -> samples -> batches, bad records, sharding, and the tiny omni world."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from omniola.data import OlaCollator, OlaDataset, RecordError, convert_record, json_to_jsonl
from omniola.data.tiny_world import write_video, write_wav

from conftest import micro_config, micro_processor, micro_tokenizer, tone, turns


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """A data root with a PNG, a WAV, an MP4 (H.264 + AAC) and its sound track as WAV."""
    root = tmp_path_factory.mktemp("media")
    image = Image.new("RGB", (40, 24), "white")
    image.paste((255, 0, 0), (4, 4, 20, 20))
    image.save(root / "shape.png")
    write_wav(root / "speech.wav", tone(1.2))
    frames = np.zeros((6, 32, 32, 3), np.uint8)
    for k in range(6):
        frames[k, 8:24, 4 + 3 * k : 12 + 3 * k] = (0, 0, 255)
    track = tone(1.5, 880.0)
    write_video(root / "clip.mp4", frames, 4, track)
    write_wav(root / "clip.wav", track)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


# One record of each of Ola's five kinds (DATA.md), plus a spoken question without an image and a text record.
RECORDS = [
    {"id": "image", "image": "shape.png", "conversations": turns("<image>\nWhat shape?", "square", "Colour?", "red")},
    {"id": "video", "video": "clip.mp4", "conversations": turns("<image>\nWhich way does it move?", "right")},
    {"id": "video_audio", "video": "clip.mp4", "audio": "clip.wav",
     "conversations": turns("<speech><image>\nHow many beeps?", "1")},
    {"id": "image_audio_q", "image": "shape.png", "audio_q": "speech.wav",
     "text_q": "<image>\nUser's question in speech: <speech>",
     "conversations": turns("<image>\nUser's question in speech: <speech>", "red")},
    {"id": "audio", "audio": "speech.wav", "conversations": turns("<speech>\nTranscribe the audio.", "a tone")},
    {"id": "audio_q", "audio_q": "speech.wav", "text_q": "<speech>\n", "conversations": turns("<speech>", "hi")},
    {"id": "text", "conversations": turns("Say yes.", "yes"), "meta": {"kind": "text"}},
]


@pytest.fixture(scope="module")
def processor():
    tokenizer = micro_tokenizer()
    return micro_processor(tokenizer, micro_config(tokenizer))


@pytest.fixture
def records_file(media, tmp_path) -> Path:
    path = tmp_path / "records.json"
    path.write_text(json.dumps(RECORDS))
    return path


def _dataset(path, media, processor, **kwargs) -> OlaDataset:
    return OlaDataset(path, media, processor, **kwargs)


# ------------------------------------------------------------------------------------------------ conversion
def test_convert_record_places_parts_at_markers(media):
    parts = {r["id"]: convert_record(r, media) for r in RECORDS}
    kinds = {rid: [p["type"] for p in c.messages[0]["content"]] for rid, c in parts.items()}
    assert kinds == {
        "image": ["image", "text"],
        "video": ["video", "text"],
        "video_audio": ["audio", "video", "text"],  # Ola's order: <speech><image>
        "image_audio_q": ["image", "text", "audio"],
        "audio": ["audio", "text"],
        "audio_q": ["audio"],
        "text": ["text"],
    }
    image = parts["image"]
    assert [m["role"] for m in image.messages] == ["user", "assistant", "user", "assistant"]
    assert image.messages[0]["content"][0]["image"] == str(media / "shape.png")
    assert image.messages[2]["content"] == [{"type": "text", "text": "Colour?"}]
    assert not any(c.use_audio_in_video for c in parts.values())
    # the video's own sound track instead of the separate file: the processor appends it after the frames
    sound_track = convert_record(RECORDS[2], media, video_audio="sound_track")
    assert [p["type"] for p in sound_track.messages[0]["content"]] == ["video", "text"]
    assert sound_track.use_audio_in_video


def test_convert_record_paths_and_leading_gpt_turn(tmp_path):
    record = {"id": "x", "image": "/old/prefix/a.png",
              "conversations": [{"from": "gpt", "value": "hello"}, *turns("<image>\nq", "a")]}
    converted = convert_record(record, tmp_path, path_map={"/old/prefix/": "/new/"})
    assert converted.messages[0]["content"][0]["image"] == "/new/a.png"
    assert [m["role"] for m in converted.messages] == ["user", "assistant"]  # Ola drops a leading gpt turn


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"id": "k", "image": "a.png", "foo": 1, "conversations": turns("<image>\nq", "a")}, "unknown key"),
        ({"id": "m", "image": "a.png", "conversations": turns("q", "a")}, "0 <image> marker"),
        ({"id": "s", "audio": "a.wav", "conversations": turns("<speech>\n<speech>", "a")}, "2 <speech> marker"),
        ({"id": "e", "conversations": turns("q", "  ")}, "answer is empty"),
        ({"id": "n", "conversations": turns("q")}, "no gpt answer"),
        ({"id": "r", "conversations": [{"from": "bot", "value": "q"}]}, "unknown speaker"),
        ({"id": "b", "image": "a.png", "video": "v.mp4", "conversations": turns("<image>\nq", "a")}, "both"),
        ({"id": "g", "conversations": turns("q", "<image> a")}, "gpt turn contains a media marker"),
    ],
)
def test_convert_record_rejects_malformed_records(record, reason, tmp_path):
    with pytest.raises(RecordError, match=reason):
        convert_record(record, tmp_path)


# ------------------------------------------------------------------------------------------------ samples
def test_dataset_loads_each_kind_with_answer_only_labels(records_file, media, processor):
    ds = _dataset(records_file, media, processor)
    assert len(ds) == len(RECORDS)
    im_end = "<|im_end|>"
    for k, record in enumerate(RECORDS):
        sample = ds[k]
        ids, labels = sample["input_ids"], sample["labels"]
        assert ids.ndim == 1 and ids.shape == labels.shape == sample["attention_mask"].shape
        counts = processor.modality_token_counts(ids)
        has_visual = "image" in record or "video" in record
        assert (counts["image"] + counts["video"] > 0) == has_visual, record["id"]
        assert (counts["audio"] > 0) == ("audio" in record or "audio_q" in record), record["id"]
        answers = [t["value"] for t in record["conversations"] if t["from"] == "gpt"]
        expected = processor.tokenizer("".join(f"{a}{im_end}\n" for a in answers), add_special_tokens=False)
        assert labels[labels != -100].tolist() == expected["input_ids"], record["id"]
        # labels are a subsequence of the ids: every learned token sits where the answer is
        assert torch.equal(ids[labels != -100], labels[labels != -100])
    assert ds.skipped == []


def test_jsonl_matches_json_and_lazy_index(records_file, media, processor, tmp_path):
    jsonl = tmp_path / "records.jsonl"
    assert json_to_jsonl(records_file, jsonl) == len(RECORDS)
    a, b = _dataset(records_file, media, processor), _dataset(jsonl, media, processor)
    assert len(a) == len(b)
    for k in (0, 3, 6):
        assert torch.equal(a[k]["input_ids"], b[k]["input_ids"])
    both = _dataset([records_file, jsonl], media, processor)
    assert len(both) == 2 * len(RECORDS) and both.record(len(RECORDS))["id"] == "image"


def test_sound_track_mode_uses_the_videos_audio(records_file, media, processor):
    ds = _dataset(records_file, media, processor, video_audio="sound_track")
    sample = ds[2]
    assert processor.modality_token_counts(sample["input_ids"])["audio"] > 0
    assert sample["audio_num_chunks"].tolist() == [1]


def test_ola_patch_files(media, processor, tmp_path):
    """Ola's patch dicts: media stored as byte ranges of one big file."""
    blobs = [(media / "shape.png").read_bytes(), (media / "speech.wav").read_bytes()]
    frames = []
    for k in range(5):
        buf = tmp_path / f"f{k}.png"
        Image.new("RGB", (32, 32), (40 * k, 0, 0)).save(buf)
        frames.append(buf.read_bytes())
    patch = tmp_path / "patch_00000"
    patch.write_bytes(b"".join(blobs + frames))
    offsets = np.cumsum([0] + [len(b) for b in blobs])
    records = [
        {"id": "ip", "image": {"patch": "patch_00000", "start_num": 0, "size": len(blobs[0])},
         "audio_q": {"patch": "patch_00000", "start_num": int(offsets[1]), "size": len(blobs[1])},
         "text_q": "<image>\nUser's question in speech: <speech>", "conversations": turns("<image>\n<speech>", "a")},
        {"id": "vp", "video": {"patch": "patch_00000", "start_num": int(offsets[2]), "size": [len(f) for f in frames]},
         "conversations": turns("<image>\nq", "a")},
    ]
    path = tmp_path / "patched.json"
    path.write_text(json.dumps(records))
    ds = _dataset(path, tmp_path, processor)
    image_sample, video_sample = ds[0], ds[1]
    assert ds.skipped == []
    assert image_sample["pixel_values"].shape[0] > 0 and image_sample["input_features"].shape[0] == 1
    # the frame patch is sampled uniformly to the processor's frame count
    assert video_sample["video_grid_thw"][0, 0].item() == processor.settings.video_num_frames


# ------------------------------------------------------------------------------------------------ batches
def test_collated_mixed_batch_gives_the_same_logits_as_each_sample(records_file, media, micro):
    model, processor = micro
    ds = _dataset(records_file, media, processor)
    samples = [ds[k] for k in range(len(RECORDS))]
    collate = OlaCollator(processor.tokenizer.pad_token_id)
    batch = collate(samples)
    lengths = [s["input_ids"].shape[0] for s in samples]
    assert batch["input_ids"].shape == (len(samples), max(lengths))
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert batch["audio_num_chunks"].tolist() == [1, 1, 1, 1]
    assert batch["input_features"].shape[0] == 4
    assert len({s["input_features"].shape[-1] for s in samples if "input_features" in s}) > 1  # re-padded in time
    with torch.no_grad():
        logits = model(**batch).logits
        for b, sample in enumerate(samples):
            alone = model(**collate([sample])).logits[0]
            torch.testing.assert_close(logits[b, : lengths[b]], alone, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ bad records
def test_bad_records_are_skipped_with_ids_and_reasons(media, processor, tmp_path):
    good = RECORDS[0]
    bad = [
        {"id": "missing", "image": "nope.png", "conversations": turns("<image>\nq", "a")},
        {"id": "corrupt", "image": "broken.png", "conversations": turns("<image>\nq", "a")},
        {"id": "unknown_key", "image": "shape.png", "extra": 1, "conversations": turns("<image>\nq", "a")},
        {"id": "markers", "image": "shape.png", "audio": "speech.wav", "conversations": turns("<image>\nq", "a")},
        {"id": "empty_answer", "audio": "speech.wav", "conversations": turns("<speech>\nq", "")},
    ]
    lines = [json.dumps(good)] + [json.dumps(r) for r in bad] + ["{not json", json.dumps(RECORDS[4])]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")

    ds = _dataset(path, media, processor)
    got = [ds[k] for k in range(len(ds))]
    assert all(s is not None for s in got)  # bad records are replaced by the next good one
    assert torch.equal(got[1]["input_ids"], got[-1]["input_ids"])  # "missing" -> ... -> the last (audio) record
    reasons = dict(ds.skipped)
    assert set(reasons) == {"missing", "corrupt", "unknown_key", "markers", "empty_answer", "mixed.jsonl:7"}
    assert "does not exist" in reasons["missing"] and "nope.png" in reasons["missing"]
    assert "could not be decoded" in reasons["corrupt"] or "not a recognised image" in reasons["corrupt"]
    assert "unknown key" in reasons["unknown_key"] and "<speech> marker" in reasons["markers"]
    assert "empty" in reasons["empty_answer"] and "not valid JSON" in reasons["mixed.jsonl:7"]
    assert "6 record(s) skipped" in ds.skip_summary()

    strict = _dataset(path, media, processor, substitute=False)
    collate = OlaCollator(processor.tokenizer.pad_token_id)
    assert strict[1] is None
    batch = collate([strict[k] for k in range(3)])  # good, missing, corrupt -> one sample
    assert batch["input_ids"].shape[0] == 1
    assert collate([strict[1], strict[2]]) is None
    assert len(strict.skipped) == 2


def test_max_length_skips_long_records(records_file, media, processor):
    ds = _dataset(records_file, media, processor, max_length=90, substitute=False)
    results = [ds[k] for k in range(len(ds))]
    reasons = dict(ds.skipped)
    assert results[6] is not None and "text" not in reasons  # the short text record fits (70 tokens)
    assert "image" in reasons and "more than max_length=90" in reasons["image"]


# ------------------------------------------------------------------------------------------------ scale
def test_shards_are_disjoint_equal_and_cover(records_file, media, processor):
    ds = _dataset(records_file, media, processor)
    shards = [ds.shard(r, 3) for r in range(3)]
    assert [len(s) for s in shards] == [2, 2, 2]  # 7 records: one dropped so ranks step together
    ids = [s.record(k)["id"] for s in shards for k in range(len(s))]
    assert len(set(ids)) == 6
    assert [len(ds.shard(r, 3, even=False)) for r in range(3)] == [3, 2, 2]
    with pytest.raises(Exception, match="rank"):
        ds.shard(3, 3)


def test_multiworker_dataloader_and_skips_seen_by_the_main_process(media, processor, tmp_path):
    records = [dict(RECORDS[k % 2 * 4], id=f"r{k}") for k in range(6)]  # image and audio records
    records[3] = {"id": "bad", "image": "nope.png", "conversations": turns("<image>\nq", "a")}
    path = tmp_path / "w.json"
    path.write_text(json.dumps(records))
    ds = _dataset(path, media, processor)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2,
                                         collate_fn=OlaCollator(processor.tokenizer.pad_token_id))
    batches = list(loader)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 2]
    skipped = ds.skipped  # reported by a worker process
    assert [rid for rid, _ in skipped] == ["bad"] and "nope.png" in skipped[0][1]
    single = [ds[k]["input_ids"] for k in range(6)]
    for b, batch in enumerate(batches):
        for j in range(2):
            n = single[2 * b + j].shape[0]
            assert torch.equal(batch["input_ids"][j, :n], single[2 * b + j])
    assert ds.skipped == skipped


# ------------------------------------------------------------------------------------------------ tiny world
def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The small tiny world, built through the CLI."""
    pytest.importorskip("easy_vqa")
    pytest.importorskip("piper")
    from omniola.data.cli import data_app

    out = tmp_path_factory.mktemp("tiny") / "world"
    result = CliRunner().invoke(data_app, ["tiny", "--out", str(out), "--seed", "3", "--scale", "small", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "records" in result.stdout
    return out


def test_tiny_world_manifest_and_records(tiny):
    from omniola.data.boxes import parse_boxes
    from omniola.data.tiny_world import SPLIT_KINDS, SPLITS, tiny_world_files

    manifest = json.loads((tiny / "manifest.json").read_text())
    assert manifest["seed"] == 3 and manifest["scale"] == "small" and manifest["builder_version"]
    assert all(manifest["counts"][s][k] > 0 for s in SPLITS for k in SPLIT_KINDS[s])
    assert "piper:en_US-joe-medium" in manifest["voices"]["train"]
    if manifest["espeak_ng"]:  # held-out voices
        assert not set(manifest["voices"]["test"]) & set(manifest["voices"]["train"])
    assert not (tiny / ".build").exists()
    train = [r for f in tiny_world_files(tiny, "train") for r in json.loads(f.read_text())]
    test = [r for f in tiny_world_files(tiny, "test") for r in json.loads(f.read_text())]
    assert len(train) == manifest["totals"]["train"]
    voices = {r["meta"].get("voice") for r in train} - {None}
    assert "piper:en_US-joe-medium" in voices
    spoken_train = {r["meta"]["transcript"] for r in train if r["meta"]["kind"] == "asr"}
    spoken_test = {r["meta"]["transcript"] for r in test if r["meta"]["kind"] == "asr"}
    assert not spoken_train & spoken_test  # held-out sentences
    for record in train + test:  # short canonical answers (transcripts and captions are sentences)
        answer = record["conversations"][-1]["value"]
        if record["meta"]["kind"] == "ground":  # each shape of the picture, with its box
            shapes = record["meta"]["picture"]["shapes"]
            assert [w for w, _ in parse_boxes(answer)] == [f"{s['color']} {s['shape']}" for s in shapes]
            continue
        long = record["meta"]["kind"].startswith(("asr", "caption", "audio_caption"))
        assert answer == answer.strip().lower() and (long or len(answer.split()) <= 3), record["id"]


def test_audio_captions_say_what_each_training_clip_sounds_like(tiny):
    """Every training sound clip and clip sound track has one `audio_caption` record, and its words agree with the
    answers of the questions asked about the same clip."""
    from omniola.data.tiny_world import tiny_world_files

    train = [r for f in tiny_world_files(tiny, "train") for r in json.loads(f.read_text())]
    captions = {r["audio"]: r["conversations"][-1]["value"] for r in train if r["meta"]["kind"] == "audio_caption"}
    clips = [r for r in train if "audio" in r and r["meta"]["kind"] not in ("audio_caption", "asr", "asr_varied")]
    assert len(captions) == sum(r["meta"]["kind"] in ("audio_qa", "audio_qa_varied", "video_audio_qa") for r in clips)
    for record in clips:
        words, answer = captions[record["audio"]], record["conversations"][-1]["value"]
        meta = record["meta"]
        if meta.get("qtype") == "count" or meta.get("template") == "move_beeps" and meta["kind"] == "video_audio_qa":
            assert words.split().count("beep") == int(answer) and set(words.split()) == {"beep"}
        elif meta.get("qtype") == "pitch" or meta.get("template") == "change_tone" and meta["kind"] == "video_audio_qa":
            assert words == f"{answer} tone"
        elif meta.get("qtype") == "kind":
            assert words == {"beeps": " ".join(["beep"] * len(words.split())), "tone": words, "noise": "noise"}[answer]
            assert answer != "tone" or words in ("high tone", "low tone")
        elif meta.get("template") == "name":
            assert words == meta["narration"].rstrip(".")
            assert meta["kind"] != "video_audio_qa" or answer in words.split()


def test_clip_dialogs_ask_the_clip_questions_and_the_cross_modal_one_first(tiny):
    """Each training clip's two chats hold the questions and answers of its single-question records, the
    cross-modal question opens `video_dialog`, and `video_visual_dialog` has the frames alone."""
    from omniola.data.tiny_world import tiny_world_files

    def pairs(conversations):  # (question without the media prompt, answer) per turn
        return [(conversations[i]["value"].split("\n")[-1], conversations[i + 1]["value"])
                for i in range(0, len(conversations), 2)]

    train = [r for f in tiny_world_files(tiny, "train") for r in json.loads(f.read_text())]
    single = {(r["video"], r["meta"]["kind"]): pairs(r["conversations"])[0] for r in train
              if r["meta"]["kind"] in ("video_visual_qa", "video_audio_qa", "video_cross_qa")}
    dialogs = [r for r in train if r["meta"]["kind"] in ("video_visual_dialog", "video_dialog")]
    assert len(dialogs) == 2 * len({video for video, _ in single}) > 0
    for record in dialogs:
        turns, video = record["conversations"], record["video"]
        asked = pairs(turns)
        assert [t["from"] for t in turns] == ["human", "gpt"] * len(asked) and len(set(asked)) == len(asked)
        assert not any("<speech>" in t["value"] or "<image>" in t["value"] for t in turns[1:])
        if record["meta"]["kind"] == "video_dialog":
            assert turns[0]["value"].startswith("<speech><image>\n") and "audio" in record
            assert asked[0] == single[video, "video_cross_qa"] and len(asked) in (4, 5)
            assert {single[video, k] for k in ("video_visual_qa", "video_audio_qa")} <= set(asked)
        else:
            assert turns[0]["value"].startswith("<image>\n") and "audio" not in record
            assert single[video, "video_visual_qa"] in asked and len(asked) in (2, 3)


def test_motion_pairs_are_their_clips_first_and_last_frame_with_its_direction_question(tiny):
    """Each training `move_beeps` clip comes back as `video_motion`: a silent two-frame clip of its first and last
    frame (the shape before and after it moves), with the clip's own direction question and answer."""
    from omniola.data.tiny_world import tiny_world_files
    from omniola.media import load_video

    visual, pairs = (json.loads(f.read_text()) for f in tiny_world_files(tiny, "train", ["video_visual_qa",
                                                                                        "video_motion"]))
    visual = {r["meta"]["clip"]: r for r in visual}
    assert len(pairs) == sum(r["meta"]["template"] == "move_beeps" for r in visual.values()) > 0
    for pair in pairs:
        clip = visual[pair["meta"]["clip"]]
        assert pair["conversations"] == clip["conversations"] and pair["meta"]["template"] == "move_beeps"
        ends = load_video(tiny / pair["video"], num_frames=8)
        whole = load_video(tiny / clip["video"], num_frames=64, with_audio=False).frames
        assert ends.frames.shape[0] == 2 and ends.audio is None
        for frame, original in zip(ends.frames, whole[[0, -1]]):
            assert np.abs(frame.astype(int) - original).mean() < 2  # the same picture (encoded apart)
        assert np.abs(whole[0].astype(int) - whole[-1]).mean() > 2  # which differ: the shape moved


def test_audio_count_gathers_every_training_beep_count_question_with_its_own_sound(tiny):
    """`audio_count` is every training counting question: `audio_qa`'s and `audio_qa_varied`'s, each with its own
    sound, and each `move_beeps` clip's sound track alone with the clip's count question (no frames)."""
    from omniola.data.tiny_world import tiny_world_files

    sounds, varied, clips, count = (json.loads(f.read_text()) for f in tiny_world_files(
        tiny, "train", ["audio_qa", "audio_qa_varied", "video_audio_qa", "audio_count"]))
    expected = [(r["audio"], r["conversations"]) for r in sounds + varied if r["meta"]["qtype"] == "count"]
    expected += [(r["audio"], [{"from": "human", "value": r["conversations"][0]["value"].replace("<image>", "")},
                               r["conversations"][1]])
                 for r in clips if r["meta"]["template"] == "move_beeps"]
    assert sorted((r["audio"], r["conversations"]) for r in count) == sorted(expected)
    assert {r["audio"].split("/")[1] for r in count} == {"sounds", "video"}
    assert all(r["conversations"][1]["value"].isdigit() for r in count)


def test_tiny_world_records_load_through_ola_dataset(tiny, processor):
    from omniola.data.tiny_world import SPLIT_KINDS, tiny_world_files

    files = tiny_world_files(tiny, "train")
    ds = OlaDataset(files, None, processor)
    kinds = set()
    for k in range(len(ds)):
        record = ds.record(k)
        if record["meta"]["kind"] in kinds:
            continue
        kinds.add(record["meta"]["kind"])
        sample = ds[k]
        assert (sample["labels"] != -100).any()
    assert len(kinds) == len(SPLIT_KINDS["train"]) and ds.skipped == []


def test_out_of_template_split_shares_nothing_with_training(tiny):
    """Sentences, question phrasings, pictures and voices of the oot split never occur in training."""
    from omniola.data.tiny_world import OOT_KINDS, out_of_template_overlap, tiny_world_files

    assert out_of_template_overlap(tiny) == {"sentences": [], "questions": [], "pictures": [], "voices": []}
    oot = [r for f in tiny_world_files(tiny, "oot") for r in json.loads(f.read_text())]
    assert {r["meta"]["kind"] for r in oot} == set(OOT_KINDS)
    spoken = [r for r in oot if "voice" in r["meta"]]
    assert spoken and all(r["meta"]["degrade"]["noise"] == "pink+hum" for r in spoken)


def test_a_missing_world_names_the_command_that_builds_the_recipes_world(tmp_path):
    from omniola.data.tiny_world import tiny_world_files
    from omniola.errors import ConfigError

    with pytest.raises(ConfigError, match=r"no manifest\.json: build it with `omniola data tiny --out .* --scale "
                                          r"full`"):
        tiny_world_files(tmp_path / "world", "test")


def test_tiny_world_is_deterministic(tiny, tmp_path):
    from omniola.data.tiny_world import build_tiny_world

    again = tmp_path / "again"
    build_tiny_world(again, seed=3, scale="small", progress=False)
    assert _hashes(again) == _hashes(tiny)


def test_tiny_world_resumes_after_interruption(tiny, tmp_path):
    from omniola.data.tiny_world import TinyWorldInterrupted, build_tiny_world
    from omniola.errors import ConfigError

    out = tmp_path / "resumed"
    with pytest.raises(TinyWorldInterrupted):
        build_tiny_world(out, seed=3, scale="small", progress=False, interrupt_after=9)
    assert not (out / "manifest.json").exists() and (out / ".build").is_dir()
    done = [p for p in (out / "media").rglob("*") if p.is_file()]
    assert 9 <= len(done) < len([p for p in (tiny / "media").rglob("*") if p.is_file()])
    # a file the killed build was writing when it died
    (done[0].parent / f".{done[0].stem}x.partial{done[0].suffix}").write_bytes(b"half a file")
    with pytest.raises(ConfigError, match="seed"):
        build_tiny_world(out, seed=4, scale="small", progress=False)
    build_tiny_world(out, seed=3, scale="small", progress=False)
    assert _hashes(out) == _hashes(tiny)


KILLED_BUILD = """
import os, signal, sys
from pathlib import Path

from omniola.data.tiny_world import build_tiny_world

out, kill_at = sys.argv[1], sys.argv[2]
replace, media = os.replace, []


def replace_or_die(src, dst):
    if kill_at == "media" and "/media/" in str(dst):  # the 6th media file written, not yet renamed into place
        media.append(dst)
        if len(media) == 6:
            os.kill(os.getpid(), signal.SIGKILL)
    if kill_at == "manifest" and Path(dst).name == "manifest.json":  # every record list written, no manifest
        os.kill(os.getpid(), signal.SIGKILL)
    replace(src, dst)


os.replace = replace_or_die
build_tiny_world(out, seed=3, scale="small", progress=False)
"""


@pytest.mark.parametrize("kill_at", ["media", "manifest"])
def test_tiny_world_sigkilled_resumes_to_the_same_files(tiny, tmp_path, kill_at):
    import subprocess
    import sys

    from omniola.data.tiny_world import build_tiny_world

    out = tmp_path / "killed"
    killed = subprocess.run([sys.executable, "-c", KILLED_BUILD, str(out), kill_at], capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (out / "manifest.json").exists() and list(out.rglob(".*.partial.*"))
    build_tiny_world(out, seed=3, scale="small", progress=False)
    assert _hashes(out) == _hashes(tiny)


def test_tiny_world_without_espeak_uses_piper(monkeypatch, tmp_path):
    """Without espeak-ng the builder still works with Piper alone, and says so."""
    pytest.importorskip("easy_vqa")
    pytest.importorskip("piper")
    from omniola.data import tiny_world

    monkeypatch.setattr(tiny_world, "_espeak_version", lambda: None)
    tiny_world.available_voices.cache_clear()
    try:
        with pytest.warns(UserWarning, match="espeak-ng is not installed"):
            manifest = tiny_world.build_tiny_world(tmp_path / "piper", seed=1, scale="small", progress=False)
    finally:
        tiny_world.available_voices.cache_clear()
    assert manifest["espeak_ng"] is None and not manifest["held_out"]["voices"]
    assert all(v == [tiny_world.PIPER_VOICE] for v in manifest["voices"].values())
    asr = json.loads((tmp_path / "piper" / "test_asr.json").read_text())
    assert asr[0]["meta"]["voice"] == tiny_world.PIPER_VOICE and (tmp_path / "piper" / asr[0]["audio"]).is_file()


def test_out_of_template_clips_ask_the_same_relations_of_other_clips():
    """Planned (not rendered): three candidates where a cross-modal question could be answered from the frames,
    out-of-template backgrounds, the tone within the colour it asks about, held-out compositions, and phrasings
    that the in-template clips never use."""
    pytest.importorskip("easy_vqa")
    from omniola.data.pictures import BACKGROUNDS, COLORS
    from omniola.data.tiny_world import SCALES, VIDEO_FPS, _bucket, _Planner, _scene_frames, available_voices

    scale = dataclasses.replace(SCALES["small"], oot_video_clips=60)
    planner = _Planner(5, scale, available_voices()[0])
    planner.plan()
    oot = {kind: planner.records["oot"][kind] for kind in ("video_visual_qa", "video_audio_qa", "video_cross_qa")}
    assert all(len(records) == 60 for records in oot.values())
    template_questions = {t["value"] for split in ("train", "val", "test") for kind in oot
                          for r in planner.records[split][kind] for t in r["conversations"] if t["from"] == "human"}
    for visual, audio, cross in zip(*oot.values()):
        scene = planner.jobs[visual["video"]]["scene"]
        assert scene["background"]["kind"] in BACKGROUNDS["oot"]
        for record in (visual, audio, cross):
            assert record["conversations"][0]["value"] not in template_questions
        answer = cross["conversations"][1]["value"]
        if scene["template"] == "name":
            assert len({o["color"] for o in scene["objects"]}) == 3 and len({o["shape"] for o in scene["objects"]}) == 3
            named = next(o for o in scene["objects"] if o["shape"] == audio["conversations"][1]["value"])
            assert answer == named["color"] and named["shape"] in scene["narration"]["text"]
            assert scene["narration"]["degrade"]["noise"] == "pink+hum"
        elif scene["template"] == "change_tone":
            (tone,) = scene["events"]
            frame = int((tone["start"] + tone["duration"] / 2) * VIDEO_FPS)
            frames = _scene_frames(scene, scene["frames"])
            x, y = scene["x"], scene["y"]
            assert np.abs(frames[frame, y, x].astype(int) - COLORS[answer]).max() == 0
            assert visual["conversations"][1]["value"] == scene["colors"][2] and len(set(scene["colors"])) == 3
        else:
            composition = ("move_beeps", scene["shape"], scene["color"], visual["conversations"][1]["value"])
            assert _bucket(5, repr(composition)) == "test"
            assert 0 <= int(answer) <= int(audio["conversations"][1]["value"]) <= 5
    answers = {r["conversations"][1]["value"] for r in oot["video_cross_qa"]}
    assert len(answers) >= 6  # colours and counts, not one answer
