"""Ola's training records -> omniola chat messages -> model inputs for one sample, and a collator.

Ola's training data (`DATA.md` of the original repository) is a JSON list of records, LLaVA style::

    {"id": "...", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"},
                                                    {"from": "gpt", "value": "a cat"}]}

The media keys say what a record holds; `<image>` and `<speech>` markers in the human turns say where:

============================  =====================================  ==========================================
kind                          keys                                   first human turn (as Ola writes it)
============================  =====================================  ==========================================
image                         `image` (a path, or a list of paths)   `"<image>\\n..."` (one marker per image)
video                         `video`                                `"<image>\\n..."` (a video also uses `<image>`)
video + audio                 `video`, `audio` (its sound track)     `"<speech><image>\\n..."`
image + spoken question       `image`, `audio_q`, `text_q`           `"<image>\\nUser's question in speech: <speech>"`
audio                         `audio`                                `"<speech>\\n..."`
spoken question, no image     `audio_q`, `text_q`                    `"<speech>\\n..."`
text only                     (none)                                 plain text
============================  =====================================  ==========================================

`text_q`, when present next to `audio_q`, replaces the first human turn (Ola does this in `_get_item`). Media
values are paths -- relative ones are resolved against the data root, absolute ones are used as they are, after
the optional `path_map` prefix rewrite -- or Ola's "patch" dicts (`{"patch": file, "start_num": byte offset,
"size": bytes}`, a list of sizes for a video's frames; `{"img_path": file}` for an image).

Conversion (:func:`convert_record`): `from: human` -> `role: user`, `gpt` -> `assistant`; each human turn becomes
typed content parts in marker order -- `<image>` -> the next `{"type": "image"}` part (or the
`{"type": "video"}` part), `<speech>` -> the `{"type": "audio"}` part -- with the text between markers as
`{"type": "text"}` parts (stripped; empty ones dropped). A conversation that opens with a gpt turn loses that
turn, as in Ola. A video + audio record takes its audio from the separate `audio` file, placed at the
`<speech>` marker (`video_audio="markers"`, Ola's behaviour and order: speech before frames), or, with
`video_audio="sound_track"`, from the video file's own sound track, which the processor appends after the
frames exactly as at omniola inference time (the `<speech>` marker and `audio` file are then not used; a video
given as frame patches has no sound track and falls back to `"markers"`).

Validation happens lazily, when a sample is loaded. A record is skipped -- never silently, never fatally --
when it has an unknown key (anything outside Ola's keys plus `extra_keys`, by default `meta`, where omniola's
tiny world keeps its own annotations), both `image` and `video` or both `audio` and `audio_q`, markers that do
not match its media in number, a marker in a gpt turn, an unknown speaker, an empty answer or no answer at all,
a missing/corrupt/empty media file, or more than `max_length` tokens. What happens then:

- `substitute=True` (default): the dataset logs a warning, records `(id, reason)` and returns the next record of
  the same shard instead, so batches keep their size and every rank keeps stepping in lock-step (a failing
  record's slot is taken by its neighbour, which that epoch is then seen twice). After `max_substitutions`
  failing records in a row it raises `InputError`: the data is broken as a whole, not a record.
- `substitute=False`: the dataset returns `None` and `OlaCollator` drops it (a batch may come out smaller, or
  `None` if nothing is left).

`dataset.skipped` lists `(id, reason)` for every record that failed so far, in any process: DataLoader workers
append to a small log file shared with the main process (a private temporary file unless `skip_log` names one),
so the main process sees their skips too. `dataset.report_skipped()` logs the summary; call it at the end of an
epoch.

Memory and scale. Records are decoded one at a time in `__getitem__`:

- JSONL (`.jsonl`, or any file whose first character is `{`): only an index of byte offsets is kept (16 bytes
  per record); each access seeks and parses one line. Nothing is parsed up front beyond finding line ends.
- JSON list: the file must be parsed once as a whole (peak memory: the Python objects of every record, a few
  times the file size); each record is then re-serialized into one compact `bytes` buffer with an offset index,
  and the parsed objects are freed. The buffer is a single object, so forked DataLoader workers share it
  copy-on-write instead of touching millions of reference counts (which copies a list of dicts into every
  worker). For the multi-GB Ola JSONs prefer converting once to JSONL with :func:`json_to_jsonl`.

`shard(rank, world_size)` gives rank `rank` every `world_size`-th record (cut to equal lengths, so ranks step
together), and `OlaDataset` works with a multi-worker `DataLoader` (it pickles cleanly for spawn, and forked
workers share the index).

Pointing `OlaDataset` at Ola's released data (`DATA.md`): download the JSONs and media; Ola's JSONs hold
absolute paths from its authors' machines, so either fix them or pass `path_map={"<their prefix>": "<yours>"}`;
relative paths resolve against `data_root` (default: the folder of each JSON file). For example::

    ds = OlaDataset(["ola_audio/Ola_audio_1169k.jsonl",
                     "ola_cross_modality_298k/Ola_cross_modality_finevideo_175k.jsonl"],
                    data_root=None, processor=processor, path_map={"/mnt/data/ola_audio/": "/data/ola_audio/"})
    loader = DataLoader(ds.shard(rank, world_size), batch_size=8, shuffle=True, num_workers=4,
                        collate_fn=OlaCollator(processor.tokenizer.pad_token_id))
"""

from __future__ import annotations

import bisect
import io
import json
import logging
import os
import re
import tempfile
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import InputError, MediaError, OmniolaError

__all__ = [
    "ConvertedRecord",
    "OlaCollator",
    "OlaDataset",
    "RecordError",
    "convert_record",
    "json_to_jsonl",
    "read_records",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

IMAGE_MARKER, SPEECH_MARKER = "<image>", "<speech>"
RECORD_KEYS = frozenset({"id", "image", "video", "audio", "audio_q", "text_q", "conversations"})
ROLES = {"human": "user", "gpt": "assistant"}
VIDEO_AUDIO_MODES = ("markers", "sound_track")
_MARKER_RE = re.compile(f"({re.escape(IMAGE_MARKER)}|{re.escape(SPEECH_MARKER)})")

# Per-sample sequence keys (the processor returns them as [1, L]; samples carry them as [L]).
SEQUENCE_PAD = {"input_ids": None, "attention_mask": 0, "labels": -100}  # None: the collator's pad_token_id
# Media tensors whose first dimension counts items; a batch concatenates them in sample order.
CONCAT_KEYS = ("pixel_values", "image_grid_hw", "pixel_values_videos", "video_grid_thw", "audio_num_chunks",
               # precomputed encoder outputs (`feature_cache`), flat over views / frames / chunks
               "image_tower_states", "video_tower_states", "audio_encoder_states", "audio_encoder_lengths")
# Audio chunk tensors padded along their last dimension (time) to the batch's longest chunk.
AUDIO_PAD_KEYS = ("input_features", "feature_attention_mask", "audio_values", "audio_values_mask")


class RecordError(InputError):
    """A training record cannot be used; the message is the reason."""


@dataclass
class ConvertedRecord:
    """One Ola record as omniola chat messages.

    Attributes:
        id: The record's `id` (or its location, `file:line`, when it has none).
        messages: `[{"role": "user" | "assistant", "content": ...}]`; user content is a list of typed parts.
        use_audio_in_video: Pass to `apply_chat_template`: the video's own sound track is the audio.
    """

    id: str
    messages: list[dict]
    use_audio_in_video: bool = False


# ------------------------------------------------------------------------------------------------ conversion
def convert_record(
    record: Mapping[str, Any],
    data_root: PathLike,
    *,
    video_audio: str = "markers",
    path_map: Mapping[str, str] | None = None,
    extra_keys: Sequence[str] = ("meta",),
    video_num_frames: int = 8,
    location: str | None = None,
) -> ConvertedRecord:
    """Converts one Ola training record into omniola chat messages (see the module docstring).

    Args:
        record: The record as parsed from JSON.
        data_root: Folder that relative media paths are resolved against.
        video_audio: `"markers"` (the `audio` file at the `<speech>` marker, as Ola) or `"sound_track"`.
        path_map: Prefix rewrites applied to every media path before resolving it (`{old: new}`).
        extra_keys: Record keys accepted besides Ola's own (and ignored).
        video_num_frames: Frames kept (uniformly) from a video given as a frame patch.
        location: Where the record comes from (`file:line`), used as its id when it has none.

    Returns:
        The record's id, messages and whether the processor should use the video's sound track.

    Raises:
        RecordError: the record is malformed (the message is the reason). Media files are opened only for
            Ola's patch dicts here; a path is checked when the processor loads it.
    """
    if not isinstance(record, Mapping):
        raise RecordError(f"a record must be a JSON object, got {type(record).__name__}")
    rid = str(record.get("id", location or "<no id>"))
    if video_audio not in VIDEO_AUDIO_MODES:
        raise InputError(f"video_audio must be one of {VIDEO_AUDIO_MODES}, got {video_audio!r}")
    unknown = sorted(set(record) - RECORD_KEYS - set(extra_keys))
    if unknown:
        raise RecordError(f"unknown key(s) {unknown}; an Ola record has {sorted(RECORD_KEYS)}"
                          + (f" (+ {sorted(extra_keys)})" if extra_keys else ""))

    turns = _turns(record)
    root = Path(data_root)

    def media(value, kind: str):
        return _resolve_media(value, kind, root, path_map or {}, video_num_frames)

    images = record.get("image")
    images = [] if images is None else images if isinstance(images, list) else [images]
    video, audio, audio_q = record.get("video"), record.get("audio"), record.get("audio_q")
    if images and video is not None:
        raise RecordError("the record has both 'image' and 'video'")
    if audio is not None and audio_q is not None:
        raise RecordError("the record has both 'audio' and 'audio_q'")
    speech = audio if audio is not None else audio_q

    use_sound_track = (video_audio == "sound_track" and video is not None and audio is not None
                       and isinstance(video, str))
    visual = [("video", video)] if video is not None else [("image", i) for i in images]
    spoken = [] if speech is None or use_sound_track else [("audio", speech)]

    n_image = sum(t["value"].count(IMAGE_MARKER) for t in turns if t["role"] == "user")
    n_speech = sum(t["value"].count(SPEECH_MARKER) for t in turns if t["role"] == "user")
    if n_image != len(visual):
        what = "video" if video is not None else "image(s)"
        raise RecordError(f"the conversation has {n_image} {IMAGE_MARKER} marker(s) but the record has "
                          f"{len(visual)} {what}")
    expected_speech = 0 if speech is None else 1
    if n_speech != expected_speech:
        raise RecordError(f"the conversation has {n_speech} {SPEECH_MARKER} marker(s) but the record has "
                          f"{expected_speech} audio file(s)")

    visual_iter, spoken_iter = iter(visual), iter(spoken)
    messages = []
    for turn in turns:
        if turn["role"] == "assistant":
            messages.append({"role": "assistant", "content": turn["value"].strip()})
            continue
        parts = []
        for piece in _MARKER_RE.split(turn["value"]):
            if piece == IMAGE_MARKER:
                kind, value = next(visual_iter)
                parts.append({"type": kind, kind: media(value, kind)})
            elif piece == SPEECH_MARKER:
                if use_sound_track:
                    continue  # the processor appends the video's own sound track after its frames
                kind, value = next(spoken_iter)
                parts.append({"type": kind, kind: media(value, kind)})
            elif piece.strip():
                parts.append({"type": "text", "text": piece.strip()})
        messages.append({"role": "user", "content": parts})
    return ConvertedRecord(id=rid, messages=messages, use_audio_in_video=use_sound_track)


def _turns(record: Mapping[str, Any]) -> list[dict]:
    """The record's conversation as `[{"role", "value"}]`, validated (with Ola's `text_q` substitution)."""
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise RecordError("'conversations' must be a non-empty list of {from, value} turns")
    turns = []
    for k, turn in enumerate(conversations):
        if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
            raise RecordError(f"turn {k} must be an object with 'from' and 'value'")
        if turn["from"] not in ROLES:
            raise RecordError(f"turn {k}: unknown speaker {turn['from']!r} (expected 'human' or 'gpt')")
        if not isinstance(turn["value"], str):
            raise RecordError(f"turn {k}: 'value' must be a string, got {type(turn['value']).__name__}")
        turns.append({"role": ROLES[turn["from"]], "value": turn["value"]})
    if record.get("audio_q") is not None and record.get("text_q") is not None:
        if not isinstance(record["text_q"], str):
            raise RecordError("'text_q' must be a string")
        turns[0] = {**turns[0], "value": record["text_q"]}  # Ola: text_q replaces the first turn
    if turns[0]["role"] == "assistant":
        turns = turns[1:]  # Ola drops a leading gpt turn
    for k, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        if IMAGE_MARKER in turn["value"] or SPEECH_MARKER in turn["value"]:
            raise RecordError(f"turn {k}: a gpt turn contains a media marker")
        if not turn["value"].strip():
            raise RecordError(f"turn {k}: the answer is empty")
    if not any(t["role"] == "assistant" for t in turns):
        raise RecordError("the conversation has no gpt answer to learn")
    return turns


def _resolve_media(value, kind: str, root: Path, path_map: Mapping[str, str], num_frames: int):
    """A media value as something the processor loads: a path string, a PIL image, a frame array or audio."""
    if isinstance(value, str):
        if not value:
            raise RecordError(f"the {kind} path is empty")
        for old, new in path_map.items():
            if value.startswith(old):
                value = new + value[len(old):]
                break
        path = Path(value)
        return os.fspath(path if path.is_absolute() else root / path)
    if isinstance(value, Mapping):
        if "img_path" in value and kind == "image":
            return _resolve_media(value["img_path"], kind, root, path_map, num_frames)
        if {"patch", "start_num", "size"} <= set(value):
            return _read_patch(value, kind, _resolve_media(value["patch"], kind, root, path_map, num_frames),
                               num_frames)
    raise RecordError(f"the {kind} value must be a path or an Ola patch dict, got {str(value)[:80]!r}")


def _read_patch(info: Mapping, kind: str, path: str, num_frames: int):
    """Reads media stored in an Ola patch file: bytes `[start_num, start_num + size)` (a list of sizes: frames)."""
    start, size = info["start_num"], info["size"]
    try:
        with open(path, "rb") as f:
            f.seek(int(start))
            if isinstance(size, list):
                blobs = [f.read(int(s)) for s in size]
            else:
                blobs = [f.read(int(size))]
    except OSError as err:
        raise MediaError(f"{kind} patch file {path!r} could not be read: {err}") from err
    if info.get("image_encoding") == "base64":
        import base64

        blobs = [base64.b64decode(b) for b in blobs]

    def image(blob: bytes) -> Image.Image:
        try:
            with Image.open(io.BytesIO(blob)) as opened:
                return opened.convert("RGB")
        except Exception as err:
            raise MediaError(f"{kind} patch in {path!r} at byte {start} is not a readable image: {err}") from err

    if kind == "image":
        if len(blobs) != 1:
            raise RecordError(f"an image patch must have one size, got {len(blobs)}")
        return image(blobs[0])
    if kind == "video":
        keep = np.linspace(0, len(blobs) - 1, min(num_frames, len(blobs))).round().astype(int)
        frames = [np.asarray(image(blobs[k])) for k in keep]
        if len({f.shape for f in frames}) != 1:
            raise MediaError(f"video patch in {path!r} at byte {start} has frames of different sizes")
        return np.stack(frames)  # [F, H, W, 3] uint8
    if len(blobs) != 1:
        raise RecordError("audio patches with a list of sizes are not supported")
    import soundfile

    try:
        samples, rate = soundfile.read(io.BytesIO(blobs[0]), dtype="float32", always_2d=True)
    except Exception as err:
        raise MediaError(f"audio patch in {path!r} at byte {start} is not readable audio: {err}") from err
    return samples, int(rate)


# ------------------------------------------------------------------------------------------------- record files
class _JsonListRecords:
    """A JSON list of records, re-serialized into one bytes buffer + offsets (see the module docstring)."""

    def __init__(self, path: Path):
        try:
            with open(path, "rb") as f:
                data = json.load(f)
        except (OSError, ValueError) as err:
            raise InputError(f"{path} could not be read as a JSON list of records: {err}") from err
        if not isinstance(data, list):
            raise InputError(f"{path} holds a JSON {type(data).__name__}; expected a list of records")
        blobs = [json.dumps(r, ensure_ascii=False, separators=(",", ":")).encode() for r in data]
        del data
        self.offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in blobs], out=self.offsets[1:])
        self.buffer = b"".join(blobs)
        self.path = path

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def location(self, i: int) -> str:
        return f"{self.path.name}[{i}]"

    def get(self, i: int) -> Any:
        return json.loads(self.buffer[self.offsets[i] : self.offsets[i + 1]])


class _JsonlRecords:
    """A JSONL file: an index of line byte offsets; each access reads and parses one line."""

    def __init__(self, path: Path):
        offsets, lines = [], []
        position = 0
        try:
            with open(path, "rb") as f:
                for number, line in enumerate(f, start=1):
                    if line.strip():
                        offsets.append(position)
                        lines.append(number)
                    position += len(line)
        except OSError as err:
            raise InputError(f"{path} could not be read: {err}") from err
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.lines = np.asarray(lines, dtype=np.int64)
        self.path = path

    def __len__(self) -> int:
        return len(self.offsets)

    def location(self, i: int) -> str:
        return f"{self.path.name}:{int(self.lines[i])}"

    def get(self, i: int) -> Any:
        with open(self.path, "rb") as f:
            f.seek(int(self.offsets[i]))
            line = f.readline()
        try:
            return json.loads(line)
        except ValueError as err:
            raise RecordError(f"line {int(self.lines[i])} of {self.path.name} is not valid JSON: {err}") from err


def _open_records(path: Path) -> _JsonListRecords | _JsonlRecords:
    if not path.is_file():
        raise InputError(f"record file {path} does not exist")
    if path.suffix.lower() == ".jsonl":
        return _JsonlRecords(path)
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"{"):
        return _JsonlRecords(path)
    return _JsonListRecords(path)


def read_records(path: PathLike) -> list[dict]:
    """All records of a JSON list or JSONL file (for inspection; `OlaDataset` reads lazily)."""
    store = _open_records(Path(path))
    return [store.get(i) for i in range(len(store))]


def json_to_jsonl(src: PathLike, dst: PathLike) -> int:
    """Rewrites a JSON list of records as JSONL (one record per line), so `OlaDataset` keeps only offsets.

    Returns:
        The number of records written.
    """
    with open(src, "rb") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise InputError(f"{src} holds a JSON {type(data).__name__}; expected a list of records")
    tmp = Path(f"{dst}.partial")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in data:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, dst)
    return len(data)


# ------------------------------------------------------------------------------------------------- skip log
class _SkipLog:
    """An append-only JSONL file of skipped records, shared by the dataset, its shards and its workers.

    The process that created a private (temporary) log deletes it when the last dataset using it is gone;
    copies sent to spawned workers never own it.
    """

    def __init__(self, path: PathLike | None):
        if path is None:
            fd, name = tempfile.mkstemp(prefix="omniola-skipped-", suffix=".jsonl")
            os.close(fd)
            self.path = name
            self._finalizer = weakref.finalize(self, _remove_if_owner, name, os.getpid())
        else:
            self.path = os.fspath(path)
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            open(self.path, "w").close()  # a new dataset starts a new log
            self._finalizer = None

    def __reduce__(self):
        return (_SkipLog._attach, (self.path,))

    @classmethod
    def _attach(cls, path: str) -> _SkipLog:
        log = cls.__new__(cls)
        log.path, log._finalizer = path, None
        return log

    def append(self, rid: str, reason: str) -> None:
        line = (json.dumps({"id": rid, "reason": reason}, ensure_ascii=False) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write of one line in append mode: lines from workers do not interleave
        finally:
            os.close(fd)

    def read(self) -> list[tuple[str, str]]:
        seen: dict[str, str] = {}
        try:
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        continue  # a line being written right now
                    seen.setdefault(entry["id"], entry["reason"])
        except FileNotFoundError:
            pass
        return list(seen.items())


def _remove_if_owner(path: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:
        try:
            os.remove(path)
        except OSError:
            pass


# ------------------------------------------------------------------------------------------------- dataset
class OlaDataset(torch.utils.data.Dataset):
    """Ola-format records turned into model inputs by the processor's chat template (the inference code path).

    Args:
        path: A JSON list or JSONL file of records, or several (concatenated in order).
        data_root: Folder for relative media paths; `None`: each record file's own folder.
        processor: The `OlaProcessor` whose `apply_chat_template(..., return_labels=True)` builds each sample.
        video_audio: `"markers"` or `"sound_track"` (see the module docstring).
        path_map: Prefix rewrites for media paths, e.g. `{"/mnt/their/data/": "/data/ola/"}`.
        extra_keys: Record keys accepted besides Ola's (default `("meta",)`).
        max_length: Records longer than this many tokens are skipped (`None`: no limit).
        substitute: On a bad record return the next good one (`True`) or `None` (`False`).
        max_substitutions: Consecutive bad records after which `__getitem__` raises.
        skip_log: File that collects skipped records across processes (`None`: a private temporary file).
        transform: Applied to each loaded sample, e.g. an `EncoderFeatureCache` (precomputed encoder outputs in
            place of raw media). Its errors propagate: they are not a record's fault, so never skipped.

    Raises:
        InputError: a record file is missing or unreadable as a whole, or an argument is invalid.
    """

    def __init__(
        self,
        path: PathLike | Sequence[PathLike],
        data_root: PathLike | None,
        processor,
        *,
        video_audio: str = "markers",
        path_map: Mapping[str, str] | None = None,
        extra_keys: Sequence[str] = ("meta",),
        max_length: int | None = None,
        substitute: bool = True,
        max_substitutions: int = 16,
        skip_log: PathLike | None = None,
        transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    ):
        if video_audio not in VIDEO_AUDIO_MODES:
            raise InputError(f"video_audio must be one of {VIDEO_AUDIO_MODES}, got {video_audio!r}")
        if max_length is not None and max_length < 1:
            raise InputError(f"max_length must be positive or None, got {max_length}")
        paths = [Path(path)] if isinstance(path, (str, os.PathLike)) else [Path(p) for p in path]
        if not paths:
            raise InputError("OlaDataset needs at least one record file")
        self.processor = processor
        self.video_audio = video_audio
        self.path_map = dict(path_map or {})
        self.extra_keys = tuple(extra_keys)
        self.max_length = max_length
        self.substitute = substitute
        self.max_substitutions = max_substitutions
        self.transform = transform
        self._sources = [_open_records(p) for p in paths]
        self._roots = [Path(data_root) if data_root is not None else p.parent for p in paths]
        self._starts = np.cumsum([0] + [len(s) for s in self._sources]).tolist()
        self._indices = np.arange(self._starts[-1], dtype=np.int64)
        self._log = _SkipLog(skip_log)
        self._reported: set[int] = set()

    def __len__(self) -> int:
        return len(self._indices)

    # ---------------------------------------------------------------------------------------------- access
    def _locate(self, position: int) -> tuple[int, int]:
        index = int(self._indices[position])
        source = bisect.bisect_right(self._starts, index) - 1
        return source, index - self._starts[source]

    def record(self, position: int) -> Any:
        """The raw record at `position` (as parsed from its file)."""
        source, local = self._locate(position)
        return self._sources[source].get(local)

    def convert(self, position: int) -> ConvertedRecord:
        """The record at `position` as chat messages.

        Raises:
            RecordError / MediaError: the record is malformed (or a patch file unreadable).
        """
        source, local = self._locate(position)
        store = self._sources[source]
        return convert_record(
            store.get(local), self._roots[source], video_audio=self.video_audio, path_map=self.path_map,
            extra_keys=self.extra_keys, video_num_frames=self.processor.settings.video_num_frames,
            location=store.location(local),
        )

    def _sample(self, position: int) -> dict[str, torch.Tensor]:
        converted = self.convert(position)
        inputs = self.processor.apply_chat_template(
            converted.messages, return_labels=True, padding_side="right",
            use_audio_in_video=converted.use_audio_in_video,
        )
        sample = {k: (v[0] if k in SEQUENCE_PAD else v) for k, v in inputs.items()}
        length = sample["input_ids"].shape[0]
        if self.max_length is not None and length > self.max_length:
            raise RecordError(f"{length} tokens, more than max_length={self.max_length}")
        return sample

    def _id(self, position: int) -> str:
        source, local = self._locate(position)
        store = self._sources[source]
        try:
            record = store.get(local)
            if isinstance(record, Mapping) and "id" in record:
                return str(record["id"])
        except Exception:
            pass
        return store.location(local)

    def __getitem__(self, position: int) -> dict[str, torch.Tensor] | None:
        """One sample: `input_ids`, `attention_mask`, `labels` as `[L]`, plus the processor's media tensors.

        A bad record is recorded and replaced by the next good one (or `None`, see `substitute`).
        """
        if not -len(self) <= position < len(self):
            raise IndexError(f"index {position} out of range for a dataset of {len(self)} records")
        position %= len(self)
        failures = []
        for attempt in range(self.max_substitutions + 1 if self.substitute else 1):
            current = (position + attempt) % len(self)
            try:
                sample = self._sample(current)
            except Exception as err:  # any failure of one record is that record's problem, never the run's
                reason = str(err) if isinstance(err, OmniolaError) else f"{type(err).__name__}: {err}"
                self._skip(current, reason)
                failures.append(reason)
                continue
            return sample if self.transform is None else self.transform(sample)
        if not self.substitute:
            return None
        raise InputError(
            f"{len(failures)} records in a row starting at index {position} could not be loaded; the data looks "
            f"broken as a whole. Last reasons: {failures[-3:]}"
        )

    def _skip(self, position: int, reason: str) -> None:
        index = int(self._indices[position])
        if index in self._reported:
            return
        self._reported.add(index)
        rid = self._id(position)
        logger.warning("skipping record %s: %s", rid, reason)
        self._log.append(rid, reason)

    # ---------------------------------------------------------------------------------------------- skips
    @property
    def skipped(self) -> list[tuple[str, str]]:
        """`(id, reason)` of every record skipped so far, by any process using this dataset (first reason)."""
        return self._log.read()

    def skip_summary(self) -> str:
        skipped = self.skipped
        if not skipped:
            return f"all records loaded ({len(self)} in this dataset)"
        lines = [f"{len(skipped)} record(s) skipped of {len(self)}:"]
        lines += [f"  {rid}: {reason}" for rid, reason in skipped[:20]]
        if len(skipped) > 20:
            lines.append(f"  ... and {len(skipped) - 20} more (dataset.skipped has them all)")
        return "\n".join(lines)

    def report_skipped(self) -> list[tuple[str, str]]:
        """Logs the summary of skipped records (call at the end of an epoch) and returns them."""
        skipped = self.skipped
        (logger.warning if skipped else logger.info)("%s", self.skip_summary())
        return skipped

    # ------------------------------------------------------------------------------------- subsets, sharding
    def _subset(self, indices: np.ndarray) -> OlaDataset:
        """This dataset over `indices` (positions in the record files), sharing its processor and skip log."""
        subset = object.__new__(OlaDataset)
        subset.__dict__.update(self.__dict__)
        subset._indices = indices
        subset._reported = set()
        return subset

    def select(self, keep: Callable[[Any], bool]) -> OlaDataset:
        """The records for which `keep(raw record)` is true, in order (each record is read once, here).

        Returns:
            A dataset sharing this one's record index, processor and skip log.
        """
        return self._subset(np.array([i for p, i in enumerate(self._indices) if keep(self.record(p))], dtype=np.int64))

    def shard(self, rank: int, world_size: int, *, even: bool = True) -> OlaDataset:
        """The records of `rank` among `world_size` processes: every `world_size`-th one, from `rank`.

        Args:
            even: Cut every shard to the same length (drops at most `world_size - 1` records), so all ranks run
                the same number of steps.

        Returns:
            A dataset sharing this one's record index, processor and skip log.
        """
        if world_size < 1 or not 0 <= rank < world_size:
            raise InputError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        indices = self._indices[rank::world_size]
        if even:
            indices = indices[: len(self._indices) // world_size]
        return self._subset(indices)


# ------------------------------------------------------------------------------------------------- collator
@dataclass
class OlaCollator:
    """Pads samples from `OlaDataset` into one batch (right padding), dropping `None` samples.

    `input_ids` / `attention_mask` / `labels` are padded with `pad_token_id` / 0 / -100; image, video and
    chunk-count tensors are concatenated in sample order; audio chunks (`input_features`,
    `feature_attention_mask`, `audio_values`, `audio_values_mask`) are zero-padded in time to the batch's
    longest chunk, which the attention masks cover. Precomputed encoder outputs (`image_tower_states`,
    `video_tower_states`, `audio_encoder_states`, `audio_encoder_lengths`; see `feature_cache`) are concatenated.

    Args:
        pad_token_id: The tokenizer's pad token id.
        pad_to_multiple_of: Round the padded sequence length up to a multiple of this.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, samples: Sequence[Mapping[str, torch.Tensor] | None]) -> dict[str, torch.Tensor] | None:
        samples = [s for s in samples if s is not None]
        if not samples:
            return None
        for s in samples:
            unknown = set(s) - set(SEQUENCE_PAD) - set(CONCAT_KEYS) - set(AUDIO_PAD_KEYS)
            if unknown:
                raise InputError(f"OlaCollator does not know how to batch {sorted(unknown)}")
        length = max(s["input_ids"].shape[0] for s in samples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, torch.Tensor] = {}
        for key, pad in SEQUENCE_PAD.items():
            if key not in samples[0]:
                continue
            pad = self.pad_token_id if pad is None else pad
            out = torch.full((len(samples), length), pad, dtype=samples[0][key].dtype)
            for b, s in enumerate(samples):
                out[b, : s[key].shape[0]] = s[key]
            batch[key] = out
        for key in CONCAT_KEYS:
            parts = [s[key] for s in samples if key in s]
            if parts:
                batch[key] = torch.cat(parts)
        for key in AUDIO_PAD_KEYS:
            parts = [s[key] for s in samples if key in s]
            if not parts:
                continue
            time = max(p.shape[-1] for p in parts)
            batch[key] = torch.cat([torch.nn.functional.pad(p, (0, time - p.shape[-1])) for p in parts])
        return batch
