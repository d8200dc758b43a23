"""Task loaders: each reads a benchmark in its community's layout and returns samples (chat messages + reference).

=============  ===================================================  ==============================================
task           data                                                 scored by
=============  ===================================================  ==============================================
`tiny`         a tiny omni world directory (default                 exact match per kind; WER for `asr`; per
               `$OMNIOLA_HOME/data/tiny`): test and, when listed,   split, side by side
               oot (or one split: test, val or oot)
`mmbench`      an MMBench TSV (index, question, hint, A-D, answer,  circular accuracy, per category and overall
               base64 image, category)                              (plus the vanilla, first-rotation accuracy)
`videomme`     a JSON list / JSONL of VideoMME rows + a video       accuracy per duration bucket and overall
               folder
`librispeech`  a LibriSpeech folder (`*.trans.txt` + `.flac`)       corpus WER after Whisper's English normaliser
`audio_qa`     a JSON list / JSONL of {audio, question, answer}     exact match after normalisation
=============  ===================================================  ==============================================

A row that cannot become a sample (missing column or field, answer not among the options, unreadable record)
becomes a sample with `error` set: it is counted as *invalid* in its task's results, never generated for and
never scored as wrong. Media are checked when the runner loads them (a failure there is counted as *failed*).

`limit` keeps the first N questions of every score group (tiny-world kind of each split, MMBench category, VideoMME
duration bucket, LibriSpeech subset); an MMBench question keeps all its rotations.

Modality-removal control (tiny, on by default when a video + audio kind is evaluated): every video + audio question
(`video_audio_qa`, `video_cross_qa`) kept is also asked without its audio and without its frames; these copies
carry `removed` (`"audio"` or `"video"`), follow the questions kept (not counted by `limit`) and are scored apart.
"""

from __future__ import annotations

import base64
import binascii
import csv
import inspect
import io
import json
import re
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..data.ola_format import VIDEO_AUDIO_MODES, RecordError, convert_record, read_records
from ..data.tiny_world import ASR_PROMPT, tiny_world_files
from ..errors import ConfigError, InputError, MediaError
from .metrics import rotate_options

__all__ = ["TASKS", "Sample", "Task", "default_tiny_dir", "load_task", "remove_modality", "tiny_splits"]

TINY_QA_KINDS = ("image_qa", "image_speech_qa", "asr", "audio_qa", "video_visual_qa", "video_audio_qa",
                 "video_cross_qa")
TINY_KINDS = ("caption", *TINY_QA_KINDS)
# Kinds whose records hold a video and its audio: the modality-removal control asks them without each.
VIDEO_AUDIO_KINDS = ("video_audio_qa", "video_cross_qa")
REMOVABLE = ("audio", "video")
# Splits `--split` can name. By default the tiny task evaluates the held-out, in-template `test` split and, when
# the world's manifest lists it, the out-of-template `oot` split (sentences, phrasings, pictures and voices that
# share nothing with training) beside it.
TINY_SPLITS = ("test", "val", "oot", "train")
TINY_DEFAULT_SPLITS = ("test", "oot")
MMBENCH_PROMPT = "Answer with the option's letter from the given choices directly."
# VideoMME's own prompt (its repository's evaluation instructions).
VIDEOMME_PROMPT = ("Select the best answer to the following multiple-choice question based on the video. "
                   "Respond with only the letter (A, B, C, or D) of the correct option.")
VIDEOMME_BUCKETS = ("short", "medium", "long")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")
LETTERS = "ABCDEFGHI"
ROTATION_BASE = 1_000_000  # official circular MMBench files: index = rotation * 1e6 + question index


@dataclass
class Sample:
    """One question to ask the model.

    Attributes:
        id: Unique within the task (`<record id>#<turn>` for later turns, `<index>@<k>` for rotations,
            `<id>/no_audio` and `<id>/no_video` for the modality-removal control).
        kind: The score group it counts in (tiny-world kind, MMBench category, VideoMME bucket, ...).
        metric: `"exact_match"`, `"choice"` (extract an option letter) or `"wer"`.
        reference: The right answer (text, option letter or transcript); a list means any of them.
        messages: Chat messages ending with the user's question (media as paths or PIL images).
        build: Builds `messages` lazily instead (decodes embedded media; may raise `MediaError`).
        options: `{letter: text}` for choice samples.
        group: Circular evaluation: the question these rotations belong to.
        rotation: The rotation (0: original order).
        use_audio_in_video: Passed to `apply_chat_template` (`None`: the processor's setting).
        error: Why the row could not become a sample (counted as invalid, not generated for).
        info: Extra fields copied to the predictions file (question text, category, source row).
        split: The data split it comes from, for tasks scored per split side by side (tiny: `test`, `oot`);
            `None` for single-split tasks.
        removed: Modality-removal control: the modality taken out of this copy of a question (`"audio"` or
            `"video"`); such copies are scored apart and never count in their kind's score. `None`: a normal
            question.
    """

    id: str
    kind: str
    metric: str
    reference: Any = None
    messages: list[dict] | None = None
    build: Callable[[], list[dict]] | None = field(default=None, repr=False)
    options: dict[str, str] | None = None
    group: str | None = None
    rotation: int = 0
    use_audio_in_video: bool | None = None
    error: str | None = None
    info: dict = field(default_factory=dict)
    split: str | None = None
    removed: str | None = None

    def get_messages(self) -> list[dict]:
        return self.messages if self.messages is not None else self.build()


@dataclass
class Task:
    """A loaded task: its samples and how to run them."""

    name: str
    source: str
    samples: list[Sample]
    max_new_tokens: int = 32
    circular: bool = False
    issues: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)


class _Limiter:
    """Keeps the first `limit` questions of each kind."""

    def __init__(self, limit: int | None):
        self.limit, self.seen = limit, Counter()

    def full(self, kind: str) -> bool:
        return self.limit is not None and self.seen[kind] >= self.limit

    def take(self, kind: str) -> bool:
        if self.limit is not None and self.seen[kind] >= self.limit:
            return False
        self.seen[kind] += 1
        return True


def _existing(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{what} {path} does not exist")
    return path


def _text(value: Any) -> str:
    """A cell as text; pandas' and csv's spellings of an empty cell become ''."""
    if value is None:
        return ""
    text = str(value).strip()
    return "" if text.lower() in ("nan", "none") else text


# ------------------------------------------------------------------------------------------------ tiny world
def default_tiny_dir() -> Path:
    """`<omniola home>/data/tiny`, where `omniola data tiny --out` puts it by convention."""
    from ..inference import omniola_home

    return omniola_home() / "data" / "tiny"


def _tiny_found(root: Path, split: str) -> list[Path]:
    """`{split}_<kind>.json(l)` record files of a directory without a manifest."""
    return sorted(p for p in root.glob(f"{split}_*.json*") if p.suffix in (".json", ".jsonl"))


def _tiny_files(root: Path, split: str, kinds: list[str] | None) -> list[tuple[str, Path]]:
    if (root / "manifest.json").is_file():
        files = tiny_world_files(root, split)
        return [(f.stem.split("_", 1)[1], f) for f in files if kinds is None or f.stem.split("_", 1)[1] in kinds]
    found = _tiny_found(root, split)
    if not found:
        raise ConfigError(f"{root} has neither manifest.json nor {split}_<kind>.json record files")
    pairs = [(p.name.split(".")[0].split("_", 1)[1], p) for p in found]
    return [(k, p) for k, p in pairs if kinds is None or k in kinds]


def tiny_splits(root: str | Path) -> list[str]:
    """The splits the tiny task evaluates by default: `test`, and `oot` when the world has it (listed in
    `manifest.json`, or `oot_<kind>.json` files in a directory without a manifest)."""
    root = Path(root)
    manifest = root / "manifest.json"
    if manifest.is_file():
        try:
            listed = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{manifest} is not a tiny-world manifest (a JSON object with \"files\"): {err}") from err
        return [s for s in TINY_DEFAULT_SPLITS if s == "test" or s in listed]
    return [s for s in TINY_DEFAULT_SPLITS if s == "test" or _tiny_found(root, s)]


def load_tiny(
    data: str | Path | None = None,
    *,
    split: str | None = None,
    kinds: list[str] | None = None,
    limit: int | None = None,
    multi_turn: str = "context",
    video_audio: str = "markers",
    modality_removal: bool | None = None,
) -> Task:
    """The tiny omni world: one score per kind of each split.

    By default the held-out, in-template `test` split and, when the world lists it, the out-of-template `oot`
    split: their samples carry `split`, and the runner scores each split apart and reports them side by side.

    Args:
        data: The world's directory (default :func:`default_tiny_dir`); any directory with a `manifest.json`
            (or `{split}_{kind}.json` files) in the same layout works.
        split: One split only: `"test"`, `"val"` or `"oot"`; `None` (default): `test`, and `oot` when listed.
        kinds: Kinds to evaluate (default: every QA kind and `asr`; `caption` only when named).
        limit: First N questions per kind (of each split).
        multi_turn: A multi-turn conversation (image_qa) gives one question per turn, asked after the previous
            turns with their *ground-truth* answers (`"context"`, the training format), or alone with the
            record's media (`"alone"`).
        video_audio: A video + audio record's sound: its `audio` file at the marker (`"markers"`, as training
            reads it by default) or the video's own sound track (`"sound_track"`).
        modality_removal: Also ask every video + audio question kept (kinds `video_audio_qa`, `video_cross_qa`)
            without its audio and without its frames (see :func:`remove_modality`), after the split's questions;
            `limit` counts only the normal questions. `None` (default): on when `kinds` has a video + audio kind.

    Raises:
        ConfigError: unknown split, kind or `multi_turn`; `modality_removal=True` without a video + audio kind.
    """
    if data is None and not default_tiny_dir().is_dir():
        raise InputError(f"no tiny world at {default_tiny_dir()}: build it with `omniola data tiny --out "
                         f"{default_tiny_dir()}` or give --data DIR")
    root = _existing(data or default_tiny_dir(), "tiny world directory")
    if split is not None and split not in TINY_SPLITS:
        raise ConfigError(f"split must be test, val or oot, got {split!r}")
    if multi_turn not in ("context", "alone"):
        raise ConfigError(f"multi_turn must be 'context' or 'alone', got {multi_turn!r}")
    if video_audio not in VIDEO_AUDIO_MODES:
        raise ConfigError(f"video_audio must be one of {list(VIDEO_AUDIO_MODES)}, got {video_audio!r}")
    if kinds:
        unknown = sorted(set(kinds) - set(TINY_KINDS))
        if unknown:
            raise ConfigError(f"unknown tiny-world kind(s) {unknown}; choose from {list(TINY_KINDS)}")
    wanted = list(kinds) if kinds else list(TINY_QA_KINDS)
    with_av = [k for k in wanted if k in VIDEO_AUDIO_KINDS]
    if modality_removal and not with_av:
        raise ConfigError(f"modality_removal asks video + audio questions ({', '.join(VIDEO_AUDIO_KINDS)}) without "
                          f"each modality, but the kinds evaluated are {wanted}")
    modality_removal = bool(with_av) if modality_removal is None else modality_removal
    splits = [split] if split is not None else tiny_splits(root)
    samples, issues = [], []
    for name in splits:
        limiter = _Limiter(limit)  # per split: `limit` questions of each kind in each
        kept = []
        for file_kind, path in _tiny_files(root, name, wanted):
            try:
                records = read_records(path)
            except (InputError, ValueError) as err:
                issues.append(f"{path}: {err}")
                continue
            for n, record in enumerate(records):
                meta = record.get("meta") if isinstance(record, dict) else None
                kind = meta.get("kind", file_kind) if isinstance(meta, dict) else file_kind
                if limiter.full(kind):
                    continue
                for sample in _tiny_samples(record, kind, root, f"{path.name}:{n}", limiter, multi_turn,
                                            video_audio):
                    sample.split = name
                    kept.append(sample)
        samples += kept
        if modality_removal:  # after the split's questions, so batches of one kind and sound setting stay together
            samples += [remove_modality(s, removed) for removed in REMOVABLE for s in kept
                        if s.kind in VIDEO_AUDIO_KINDS]
    return Task(
        name="tiny", source=str(root), samples=samples, max_new_tokens=32, issues=issues,
        settings={"split": splits[0], "splits": splits, "kinds": wanted, "multi_turn": multi_turn,
                  "video_audio": video_audio, "modality_removal": modality_removal},
    )


def remove_modality(sample: Sample, removed: str) -> Sample:
    """A copy of a video + audio question with one modality taken out of every user turn.

    `"audio"`: the audio parts are dropped and the video's own sound track is not used (`use_audio_in_video`
    False); the frames stay. `"video"`: the video parts are dropped; the audio stays as it was -- or, when the
    sample took its sound from the video's track (`video_audio="sound_track"`), the same file comes in as an audio
    part where the video was, so the model hears the very track it hears with the frames (`load_audio` decodes an
    MP4's sound track). A copy of an invalid sample keeps its error; a sample without that modality gets one.

    Returns:
        The copy, with `id` `<id>/no_<removed>` and `removed` set.
    """
    if removed not in REMOVABLE:
        raise ConfigError(f"removed must be one of {REMOVABLE}, got {removed!r}")
    copy = replace(sample, id=f"{sample.id}/no_{removed}", removed=removed, use_audio_in_video=False,
                   info=dict(sample.info))
    if sample.error is not None:
        return copy
    track = bool(sample.use_audio_in_video)  # the sound comes with the video file
    found = removed == "audio" and track

    def keep(part: dict) -> list[dict]:
        nonlocal found
        if part["type"] != removed:
            return [part]
        found = True
        return [{"type": "audio", "audio": part["video"]}] if removed == "video" and track else []

    messages = [{**m, "content": [q for p in m["content"] for q in keep(p)]} if m["role"] == "user"
                and isinstance(m["content"], list) else m for m in sample.get_messages()]
    if not found:
        return replace(copy, error=f"{sample.id}: no {removed} to remove (modality-removal control)")
    return replace(copy, messages=messages, build=None)


def _tiny_samples(record, kind: str, root: Path, where: str, limiter: _Limiter, multi_turn: str,
                  video_audio: str) -> list[Sample]:
    metric = "wer" if kind == "asr" else "exact_match"
    try:
        converted = convert_record(record, root, video_audio=video_audio, location=where)
    except RecordError as err:
        limiter.take(kind)
        rid = str(record.get("id", where)) if isinstance(record, dict) else where
        return [Sample(id=rid, kind=kind, metric=metric, error=f"{where}: {err}")]
    messages, out = converted.messages, []
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    first_media = [p for p in messages[0]["content"] if p["type"] != "text"] if messages else []
    for turn, i in enumerate(answers):
        if not limiter.take(kind):
            break
        user = messages[i - 1]
        if turn == 0 or multi_turn == "context":
            prompt = messages[:i]
        else:  # asked alone: this turn's text with the record's media
            prompt = [{"role": "user", "content": first_media + [p for p in user["content"] if p["type"] == "text"]}]
        question = " ".join(p["text"] for p in user["content"] if p["type"] == "text")
        meta = record.get("meta") if isinstance(record, dict) else None
        # the question's template: video kinds name / move_beeps / change_tone, sound questions count / pitch / kind
        template = (meta.get("template") or meta.get("qtype")) if isinstance(meta, dict) else None
        out.append(Sample(
            id=converted.id if len(answers) == 1 else f"{converted.id}#{turn}", kind=kind, metric=metric,
            reference=messages[i]["content"], messages=prompt, use_audio_in_video=converted.use_audio_in_video,
            info={"question": question, **({"template": template} if template is not None else {})},
        ))
    return out


# ---------------------------------------------------------------------------------------------------- MMBench
def _decode_image(b64: str, where: str):
    from PIL import Image

    try:
        with Image.open(io.BytesIO(base64.b64decode(b64, validate=False))) as image:
            return image.convert("RGB")
    except (binascii.Error, ValueError, OSError) as err:
        raise MediaError(f"{where}: the image column is not a base64-encoded image ({err})") from err


def load_mmbench(data: str | Path, *, limit: int | None = None, circular: bool = True) -> Task:
    """Multiple-choice image QA from an MMBench TSV.

    Columns: `index`, `question`, `hint` (optional), `A`, `B` (`C`, `D`, ... optional), `answer` (a letter),
    `image` (base64; a short value naming another row's `index` reuses that row's image, as official files do),
    `category` (optional). A missing required column makes every row invalid (reported, not fatal).

    Circular evaluation: if the file already holds the rotations (official circular files: some `index` >= 1e6,
    the rotations of a question sharing `index % 1e6`), they are grouped by `index % 1e6`; otherwise each row's
    rotations are generated here (`n` options -> `n` rotations, option `i` showing the text of `(i + k) mod n`).
    `circular=False` asks each row once (vanilla accuracy).
    """
    path = _existing(data, "MMBench TSV file")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images are long cells
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t")
            columns = reader.fieldnames or []
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"{path} is not a readable TSV file: {err}") from err
    issues = []
    missing = [c for c in ("question", "answer", "image", "A", "B") if c not in columns]
    if missing:
        issues.append(f"{path}: missing column(s) {missing}; every row is invalid")
    letters = [c for c in LETTERS if c in columns]
    indices = [_text(r.get("index")) or str(n) for n, r in enumerate(rows)]
    images = {i: _text(r.get("image")) for i, r in zip(indices, rows)}
    given = circular and any(i.isdigit() and int(i) >= ROTATION_BASE for i in indices)
    limiter, seen_groups, samples = _Limiter(limit), set(), []
    for n, (index, row) in enumerate(zip(indices, rows)):
        where = f"{path.name}:{n + 2}"  # line of the row (the header is line 1)
        kind = _text(row.get("category")) or "all"
        group = str(int(index) % ROTATION_BASE) if given and index.isdigit() else index
        if group not in seen_groups:
            if not limiter.take(kind):
                continue
            seen_groups.add(group)
        rotation = int(index) // ROTATION_BASE if given and index.isdigit() else 0
        base = dict(kind=kind, metric="choice", group=group, info={"category": kind, "row": where})
        if missing:
            samples.append(Sample(id=index, rotation=rotation, error=f"{where}: missing column(s) {missing}", **base))
            continue
        options = {c: _text(row.get(c)) for c in letters if _text(row.get(c))}
        answer, question = _text(row.get("answer")).upper(), _text(row.get("question"))
        image = images[index]
        if len(image) <= 64 and image in images:  # a reference to another row's image
            image = images[image]
        error = None
        if len(options) < 2:
            error = f"{where}: fewer than two options"
        elif answer not in options:
            error = f"{where}: answer {answer!r} is not one of the options {list(options)}"
        elif not question:
            error = f"{where}: empty question"
        elif not image:
            error = f"{where}: empty image"
        if error:
            samples.append(Sample(id=index, rotation=rotation, error=error, **base))
            continue
        hint = _text(row.get("hint"))
        texts = list(options.values())
        rotations = range(len(texts)) if circular and not given else [0]
        for k in rotations:
            rotated, right = rotate_options(texts, list(options).index(answer), k)
            opts = dict(zip(letters[: len(rotated)], rotated))
            samples.append(Sample(
                id=index if k == 0 else f"{index}@{k}", reference=list(opts)[right], options=opts,
                rotation=rotation if given else k,
                build=_mmbench_messages(image, hint, question, opts, where),
                **{**base, "info": {**base["info"], "question": question}},
            ))
    mode = "given" if given else ("generated" if circular else "off")
    return Task(name="mmbench", source=str(path), samples=samples, max_new_tokens=32, circular=circular,
                issues=issues, settings={"circular": mode})


def _mmbench_messages(image_b64: str, hint: str, question: str, options: dict[str, str], where: str):
    def build() -> list[dict]:
        lines = ([f"Hint: {hint}"] if hint else []) + [f"Question: {question}", "Options:"]
        lines += [f"{letter}. {text}" for letter, text in options.items()] + [MMBENCH_PROMPT]
        return [{"role": "user", "content": [{"type": "image", "image": _decode_image(image_b64, where)},
                                             {"type": "text", "text": "\n".join(lines)}]}]

    return build


# --------------------------------------------------------------------------------------------------- VideoMME
def _records(path: Path) -> list:
    try:
        records = read_records(path)
    except (ValueError, UnicodeDecodeError) as err:
        raise InputError(f"{path} is neither a JSON list nor JSONL: {err}") from err
    return records


def _options(value: Any) -> dict[str, str] | None:
    """VideoMME's `["A. text", ...]` (or a `{letter: text}` dict, or bare texts in letter order)."""
    if isinstance(value, dict):
        return {str(k).strip().upper(): str(v).strip() for k, v in value.items()}
    if not isinstance(value, list) or not value:
        return None
    out = {}
    for k, item in enumerate(value):
        m = re.match(r"^\s*\(?([A-Z])[.):]\s*(.*)$", str(item), flags=re.DOTALL)
        letter, text = (m.group(1), m.group(2).strip()) if m else (LETTERS[k], str(item).strip())
        out[letter] = text
    return out


def _find_video(row: dict, videos: Path) -> Path | None:
    if row.get("video"):
        return Path(row["video"]) if Path(row["video"]).is_absolute() else videos / row["video"]
    for key in ("videoID", "video_id"):
        if row.get(key):
            stem = str(row[key])
            for suffix in VIDEO_SUFFIXES:
                if (videos / f"{stem}{suffix}").exists():
                    return videos / f"{stem}{suffix}"
            return videos / f"{stem}.mp4"  # missing: the runner reports it as a media failure
    return None


def load_videomme(data: str | Path, *, media: str | Path | None = None, limit: int | None = None) -> Task:
    """Multiple-choice video QA in VideoMME's layout, from a JSON list or JSONL file.

    Each row: `question`, `options` (`["A. ...", "B. ...", "C. ...", "D. ..."]`), `answer` (a letter),
    `duration` (`short` / `medium` / `long`), and the video as `video` (a path) or `videoID` / `video_id`
    (the file `<media>/<id>.mp4`, or .mkv/.webm/...); optional `question_id`, `task_type`, `domain`.
    `media` defaults to `<file's folder>/videos` when it exists, else the file's folder. The video is read with
    its sound track when the model uses audio in video (the processor's setting).
    """
    path = _existing(data, "VideoMME file")
    videos = Path(media) if media else (path.parent / "videos" if (path.parent / "videos").is_dir() else path.parent)
    limiter, samples = _Limiter(limit), []
    for n, row in enumerate(_records(path)):
        where = f"{path.name}:{n + 1}"
        if not isinstance(row, dict):
            samples.append(Sample(id=where, kind="unknown", metric="choice", error=f"{where}: not an object"))
            continue
        kind = _text(row.get("duration")).lower() or "unknown"
        if not limiter.take(kind):
            continue
        rid = _text(row.get("question_id")) or where
        options, answer = _options(row.get("options")), _text(row.get("answer")).upper()
        video = _find_video(row, videos)
        question = _text(row.get("question"))
        error = None
        missing = [k for k, v in (("question", question), ("options", options), ("answer", answer),
                                  ("video or videoID", video)) if not v]
        if missing:
            error = f"{where}: missing field(s) {missing}"
        elif answer not in options:
            error = f"{where}: answer {answer!r} is not one of the options {list(options)}"
        if error:
            samples.append(Sample(id=rid, kind=kind, metric="choice", error=error))
            continue
        text = "\n".join([VIDEOMME_PROMPT, question, *(f"{k}. {v}" for k, v in options.items()),
                          "The best answer is:"])
        samples.append(Sample(
            id=rid, kind=kind, metric="choice", reference=answer, options=options,
            messages=[{"role": "user", "content": [{"type": "video", "video": str(video)},
                                                   {"type": "text", "text": text}]}],
            info={"question": question, "video": str(video), "task_type": row.get("task_type")},
        ))
    return Task(name="videomme", source=str(path), samples=samples, max_new_tokens=32,
                settings={"media": str(videos)})


# ------------------------------------------------------------------------------------------------ LibriSpeech
def load_librispeech(data: str | Path, *, limit: int | None = None, prompt: str = ASR_PROMPT) -> Task:
    """ASR in LibriSpeech's layout: `<speaker>/<chapter>/<speaker>-<chapter>.trans.txt` with `UTT-ID TRANSCRIPT`
    lines, next to `UTT-ID.flac`. `data` is a subset (`LibriSpeech/test-clean`) or a folder of subsets
    (`LibriSpeech/`, scored per subset). The model is asked `prompt` about each utterance."""
    root = _existing(data, "LibriSpeech folder")
    transcripts = sorted(root.rglob("*.trans.txt"))
    if not transcripts:
        raise InputError(f"{root} holds no <speaker>/<chapter>/*.trans.txt files (LibriSpeech layout)")
    limiter, samples = _Limiter(limit), []
    for trans in transcripts:
        parts = trans.relative_to(root).parts
        kind = parts[0] if len(parts) >= 4 else root.name
        for n, line in enumerate(trans.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            if not limiter.take(kind):
                break
            utt, _, text = line.strip().partition(" ")
            if not text.strip():
                samples.append(Sample(id=utt, kind=kind, metric="wer",
                                      error=f"{trans}:{n + 1}: expected 'UTT-ID TRANSCRIPT'"))
                continue
            audio = trans.parent / f"{utt}.flac"
            if not audio.exists() and (trans.parent / f"{utt}.wav").exists():
                audio = trans.parent / f"{utt}.wav"
            samples.append(Sample(
                id=utt, kind=kind, metric="wer", reference=text.strip(),
                messages=[{"role": "user", "content": [{"type": "audio", "audio": str(audio)},
                                                       {"type": "text", "text": prompt}]}],
            ))
    return Task(name="librispeech", source=str(root), samples=samples, max_new_tokens=256,
                settings={"prompt": prompt})


# ------------------------------------------------------------------------------------------- open audio QA
def load_audio_qa(data: str | Path, *, media: str | Path | None = None, limit: int | None = None) -> Task:
    """Open-ended audio QA from a JSON list or JSONL: `audio` (path, relative to `media`, default the file's
    folder), `question`, `answer` (a string or a list of accepted answers); optional `id`, `category` (score
    group). Scored by exact match after normalisation."""
    path = _existing(data, "audio QA file")
    root = Path(media) if media else path.parent
    limiter, samples = _Limiter(limit), []
    for n, row in enumerate(_records(path)):
        where = f"{path.name}:{n + 1}"
        if not isinstance(row, dict):
            samples.append(Sample(id=where, kind="audio_qa", metric="exact_match", error=f"{where}: not an object"))
            continue
        kind = _text(row.get("category")) or "audio_qa"
        if not limiter.take(kind):
            continue
        rid = _text(row.get("id")) or where
        answer = row.get("answer")
        answers = [str(a) for a in answer] if isinstance(answer, list) else [_text(answer)] if _text(answer) else []
        missing = [k for k, ok in (("audio", _text(row.get("audio"))), ("question", _text(row.get("question"))),
                                   ("answer", answers)) if not ok]
        if missing:
            samples.append(Sample(id=rid, kind=kind, metric="exact_match",
                                  error=f"{where}: missing field(s) {missing}"))
            continue
        audio = Path(row["audio"]) if Path(row["audio"]).is_absolute() else root / row["audio"]
        samples.append(Sample(
            id=rid, kind=kind, metric="exact_match", reference=answers if len(answers) > 1 else answers[0],
            messages=[{"role": "user", "content": [{"type": "audio", "audio": str(audio)},
                                                   {"type": "text", "text": _text(row["question"])}]}],
            info={"question": _text(row["question"])},
        ))
    return Task(name="audio_qa", source=str(path), samples=samples, max_new_tokens=32)


TASKS: dict[str, Callable[..., Task]] = {
    "tiny": load_tiny,
    "mmbench": load_mmbench,
    "videomme": load_videomme,
    "librispeech": load_librispeech,
    "audio_qa": load_audio_qa,
}


def load_task(name: str, data: str | Path | None = None, **options) -> Task:
    """Loads task `name` from `data`; `options` are the loader's keyword arguments (`None` values are dropped).

    Raises:
        ConfigError: unknown task, an option the task does not take, or no `data` for a task that needs it.
        InputError: the data file or folder is missing or unreadable as a whole.
    """
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    loader = TASKS[name]
    accepted = set(inspect.signature(loader).parameters) - {"data"}
    options = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ConfigError(f"task {name!r} does not take option(s) {unknown}; it takes {sorted(accepted)}")
    if data is None and name != "tiny":
        raise ConfigError(f"task {name!r} needs --data (its file or folder)")
    return loader(data, **options)
