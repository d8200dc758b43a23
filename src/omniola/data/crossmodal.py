"""Cross-modal QA construction for real videos: Ola's pipeline for question-answer pairs that need both the
picture and the sound.

For each video (`.mp4`, `.mkv`, `.webm`, `.mov` under a folder):

1. the transcript: a sibling subtitle file with the same stem (`clip.srt` or `clip.vtt`), or else the video's sound
   track run through a :class:`Transcriber` (none given: the video is skipped with reason `no_subtitles`);
2. `N` frames sampled with :func:`omniola.media.load_video`; the generator is text-only, so the prompt carries the
   frame *timestamps* (plus a description per frame when a `describe_frames` hook is given -- the extension point
   for a captioning model);
3. a :class:`QAGenerator` (any OpenAI-compatible endpoint, or a local omniola model) is asked for strict JSON, a
   list of `{"question", "answer"}`; :func:`parse_qa_pairs` strips code fences and finds the JSON array;
4. unparsable generations, malformed items, empty questions or answers and duplicate questions are dropped and
   counted by reason.

Output, in `OUT/`:

- `crossmodal.json`: a JSON list of Ola video + audio records (the `ola_format` "video + audio" kind)::

      {"id": "clip_0", "video": "../videos/clip.mp4", "audio": "../videos/clip.mp4",
       "conversations": [{"from": "human", "value": "<speech><image>\\nWhat is on screen when ...?"},
                         {"from": "gpt", "value": "..."}]}

  `video` and `audio` are the same file (the video's own sound track is the audio; `load_audio` decodes it with
  PyAV), written relative to `OUT` -- so load the records with `data_root=OUT` (`OlaDataset`, `convert_record`).
  With `video_audio="sound_track"` the `<speech>` marker is dropped and the sound track follows the frames, as at
  omniola inference.
- `crossmodal_report.json`: counts of videos, records, skipped videos and dropped pairs by reason.
- `cache/<video key>.json`: one file per finished video; a rerun skips those videos (resumable).

Both JSON files are written atomically (`omniola.files.write_text_atomic`).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import ConfigError, InputError, MediaError, OmniolaError
from ..files import write_text_atomic

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov")
SUBTITLE_SUFFIXES = (".srt", ".vtt")
DEFAULT_PROMPTS = Path(__file__).with_name("crossmodal_prompts.txt")
HUMAN_PREFIX = "<speech><image>\n"  # ola_format's video + audio convention: speech before the frames
PLACEHOLDERS = ("video_name", "duration", "num_questions", "transcript", "frames")
CACHE_VERSION = 1

logger = logging.getLogger(__name__)


class SubtitleError(InputError):
    """A subtitle file (SRT/VTT) could not be parsed."""


class GenerationParseError(OmniolaError):
    """A generator's reply holds no JSON list of question-answer pairs."""


# --------------------------------------------------------------------------------------------------
# Subtitles
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cue:
    """One subtitle or transcript segment: `text` spoken from `start` to `end` seconds."""

    start: float
    end: float
    text: str


_TIME_RE = re.compile(r"(?:(\d+):)?(\d{1,2}):(\d{2})[.,](\d{1,3})")
_ARROW_RE = re.compile(r"^\s*(\S+)\s*-->\s*(\S+)")
_TAG_RE = re.compile(r"<[^>]*>|\{\\[^}]*\}")


def _seconds(stamp: str, *, source: str) -> float:
    m = _TIME_RE.fullmatch(stamp.strip())
    if not m:
        raise SubtitleError(f"{source}: bad timestamp {stamp!r} (expected HH:MM:SS,mmm or MM:SS.mmm)")
    hours, minutes, secs, frac = m.groups()
    return int(hours or 0) * 3600 + int(minutes) * 60 + int(secs) + int(frac.ljust(3, "0")) / 1000


def _parse_cues(text: str, *, source: str) -> list[Cue]:
    """Shared SRT/VTT body parser: blocks separated by blank lines, each with one `start --> end` line."""
    cues = []
    blocks = re.split(r"\n\s*\n", text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff"))
    for block in blocks:
        lines = [line for line in block.split("\n") if line.strip()]
        timing = next((i for i, line in enumerate(lines) if "-->" in line), None)
        if timing is None:
            continue  # numbering-only, WEBVTT header, NOTE, STYLE or REGION blocks
        m = _ARROW_RE.match(lines[timing])
        if not m:
            raise SubtitleError(f"{source}: bad timing line {lines[timing]!r}")
        start, end = _seconds(m.group(1), source=source), _seconds(m.group(2), source=source)
        words = " ".join(_TAG_RE.sub("", line).strip() for line in lines[timing + 1:])
        words = re.sub(r"\s+", " ", words).strip()
        if words:
            cues.append(Cue(start, max(start, end), words))
    return cues


def parse_srt(text: str, *, source: str = "<srt>") -> list[Cue]:
    """Parses SubRip text (`1\\n00:00:01,000 --> 00:00:02,500\\nHello\\n\\n...`); tags are removed.

    Raises:
        SubtitleError: a timing line or timestamp is malformed (the message names `source`).
    """
    return _parse_cues(text, source=source)


def parse_vtt(text: str, *, source: str = "<vtt>") -> list[Cue]:
    """Parses WebVTT text (a `WEBVTT` header, optional cue ids and settings, `MM:SS.mmm` or `HH:MM:SS.mmm`).

    Raises:
        SubtitleError: the header is missing or a timing line is malformed.
    """
    if not text.lstrip("\ufeff").startswith("WEBVTT"):
        raise SubtitleError(f"{source}: a WebVTT file must start with 'WEBVTT'")
    return _parse_cues(text, source=source)


def read_subtitles(path: str | os.PathLike) -> list[Cue]:
    """Reads an `.srt` or `.vtt` file (UTF-8)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig", errors="replace")
    except OSError as err:
        raise SubtitleError(f"{path}: cannot read subtitles ({err})") from err
    parse = parse_vtt if path.suffix.lower() == ".vtt" else parse_srt
    return parse(text, source=str(path))


def find_subtitles(video: str | os.PathLike) -> Path | None:
    """The sibling subtitle file with the video's stem (`.srt` first, then `.vtt`), or None."""
    video = Path(video)
    for suffix in SUBTITLE_SUFFIXES:
        for candidate in (video.with_suffix(suffix), video.with_suffix(suffix.upper())):
            if candidate.is_file():
                return candidate
    return None


def format_transcript(cues: Sequence[Cue]) -> str:
    """One `[start - end] text` line per cue, times in seconds with one decimal."""
    return "\n".join(f"[{c.start:.1f} - {c.end:.1f}] {c.text}" for c in cues)


# --------------------------------------------------------------------------------------------------
# Transcribers
# --------------------------------------------------------------------------------------------------


class Transcriber(Protocol):
    """Turns a sound track (`float32` mono samples, shape `[T]`) into timed cues."""

    def __call__(self, audio: np.ndarray, sampling_rate: int) -> list[Cue]: ...


class WhisperTranscriber:
    """transformers' Whisper ASR pipeline over a local model (a directory or an already cached hub id).

    Nothing is downloaded (`local_files_only=True`); the model is loaded on first use.
    """

    def __init__(self, model: str | os.PathLike, *, device: str | None = None):
        self.model, self.device = str(model), device
        self._pipe = None

    def _pipeline(self):
        if self._pipe is None:
            from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor, pipeline

            try:
                model = AutoModelForSpeechSeq2Seq.from_pretrained(self.model, local_files_only=True)
                processor = AutoProcessor.from_pretrained(self.model, local_files_only=True)
            except OSError as err:
                raise ConfigError(f"transcriber: no local Whisper model at {self.model!r} ({err}); give a "
                                  f"model directory or use --transcriber none") from err
            self._pipe = pipeline("automatic-speech-recognition", model=model, tokenizer=processor.tokenizer,
                                  feature_extractor=processor.feature_extractor, device=self.device)
        return self._pipe

    def __call__(self, audio: np.ndarray, sampling_rate: int) -> list[Cue]:
        out = self._pipeline()({"raw": audio, "sampling_rate": sampling_rate}, return_timestamps=True,
                               chunk_length_s=30)
        duration = len(audio) / sampling_rate
        cues = []
        for chunk in out.get("chunks") or [{"timestamp": (0.0, duration), "text": out.get("text", "")}]:
            start, end = chunk["timestamp"]
            start = float(start or 0.0)
            end = float(end) if end is not None else duration
            if chunk["text"].strip():
                cues.append(Cue(start, end, chunk["text"].strip()))
        return cues


def make_transcriber(name: str | None) -> Transcriber | None:
    """`None`/`"none"` -> no transcriber; anything else is a local Whisper model dir or cached hub id
    (`whisper-tiny.en` is read as `openai/whisper-tiny.en`, only if already in the local cache)."""
    if name is None or name.lower() == "none":
        return None
    if not Path(name).exists() and name.startswith("whisper-"):
        name = f"openai/{name}"
    return WhisperTranscriber(name)


# --------------------------------------------------------------------------------------------------
# Prompts and generators
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompts:
    """The system prompt and the user template (placeholders `{video_name}`, `{duration}`, `{num_questions}`,
    `{transcript}`, `{frames}`; other braces are kept verbatim, so JSON examples need no escaping)."""

    system: str
    user: str

    def render(self, **values: Any) -> str:
        text = self.user
        for key in PLACEHOLDERS:
            text = text.replace("{" + key + "}", str(values[key]))
        return text


def load_prompts(path: str | os.PathLike | None = None) -> Prompts:
    """Reads a prompt file: `### system` and `### user` sections (see `crossmodal_prompts.txt`).

    Raises:
        ConfigError: the file is missing, a section is absent or empty, or the user template uses no placeholder.
    """
    path = Path(path) if path is not None else DEFAULT_PROMPTS
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"prompts file {path}: cannot read it ({err})") from err
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = re.fullmatch(r"###\s*(\w+)\s*", line)
        if m:
            current = m.group(1).lower()
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    body = {k: "\n".join(v).strip() for k, v in sections.items()}
    for key in ("system", "user"):
        if not body.get(key):
            raise ConfigError(f"prompts file {path}: the '### {key}' section is missing or empty")
    if not any("{" + p + "}" in body["user"] for p in PLACEHOLDERS):
        raise ConfigError(f"prompts file {path}: the user template uses none of the placeholders "
                          f"{['{' + p + '}' for p in PLACEHOLDERS]}")
    return Prompts(system=body["system"], user=body["user"])


class QAGenerator(Protocol):
    """A text-only LLM: takes a system prompt and a user message, returns the reply text."""

    def __call__(self, system: str, user: str) -> str: ...


class OpenAIGenerator:
    """Any OpenAI-compatible chat-completions endpoint, through the official `openai` client."""

    def __init__(self, api_base: str, model: str, *, api_key: str | None = None, temperature: float = 0.7,
                 max_tokens: int = 1024, timeout: float = 120.0, max_retries: int = 2):
        from openai import OpenAI

        self.model, self.temperature, self.max_tokens = model, temperature, max_tokens
        self.client = OpenAI(base_url=api_base, api_key=api_key or "EMPTY", timeout=timeout,
                             max_retries=max_retries)

    def __call__(self, system: str, user: str) -> str:
        reply = self.client.chat.completions.create(
            model=self.model, temperature=self.temperature, max_tokens=self.max_tokens,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
        )
        return reply.choices[0].message.content or ""


class LocalModelGenerator:
    """A local omniola checkpoint (text only), via `omniola.inference.load_model` and the generation engine."""

    def __init__(self, model_dir: str | os.PathLike, *, device: str | None = None, max_new_tokens: int = 1024):
        from ..generation import Engine, GenerationOptions
        from ..inference import load_model

        self.model, self.processor = load_model(model_dir, device=device)
        self.engine = Engine(self.model, self.processor, max_batch=1)
        self.options = GenerationOptions(max_new_tokens=max_new_tokens)

    def __call__(self, system: str, user: str) -> str:
        inputs = self.processor.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": user}])
        return self.engine.generate(inputs, self.options).text


# --------------------------------------------------------------------------------------------------
# Parsing the generations
# --------------------------------------------------------------------------------------------------

_FENCE_RE = re.compile(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)```", re.DOTALL)


def parse_qa_pairs(text: str) -> list[Any]:
    """Finds the JSON list in a generator's reply: inside a code fence if there is one, else the first `[` that
    starts a valid JSON array. An object holding one list (`{"pairs": [...]}`) is accepted too.

    Returns:
        The list's items, unchecked (see :func:`clean_pairs`).

    Raises:
        GenerationParseError: no JSON list is found.
    """
    candidates = [m.group(1) for m in _FENCE_RE.finditer(text)] + [text]
    decoder = json.JSONDecoder()
    for candidate in candidates:
        for m in re.finditer(r"[\[{]", candidate):
            try:
                value, _ = decoder.raw_decode(candidate, m.start())
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                lists = [v for v in value.values() if isinstance(v, list)]
                value = lists[0] if len(lists) == 1 else None
            if isinstance(value, list) and (not value or any(isinstance(v, dict) for v in value)):
                return value
    raise GenerationParseError(f"no JSON list of question-answer pairs in the reply: {text[:80]!r}")


def _question_key(question: str) -> str:
    return re.sub(r"[\W_]+", " ", question.lower()).strip()


def clean_pairs(items: Iterable[Any], *, limit: int | None = None,
                seen: set[str] | None = None) -> tuple[list[tuple[str, str]], Counter]:
    """Keeps well-formed, non-empty, new `(question, answer)` pairs; counts the rest by reason.

    Reasons: `invalid_item` (not an object with string `question` and `answer`), `empty_question`,
    `empty_answer`, `duplicate_question` (same words, ignoring case and punctuation), `over_limit` (beyond `limit`).
    """
    seen = set() if seen is None else seen
    kept, dropped = [], Counter()
    for item in items:
        if not (isinstance(item, dict) and isinstance(item.get("question"), str)
                and isinstance(item.get("answer"), (str, int, float)) and not isinstance(item.get("answer"), bool)):
            dropped["invalid_item"] += 1
            continue
        question, answer = item["question"].strip(), str(item["answer"]).strip()
        key = _question_key(question)
        if not key:
            dropped["empty_question"] += 1
        elif not answer:
            dropped["empty_answer"] += 1
        elif key in seen:
            dropped["duplicate_question"] += 1
        elif limit is not None and len(kept) >= limit:
            dropped["over_limit"] += 1
        else:
            seen.add(key)
            kept.append((question, answer))
    return kept, dropped


# --------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------

FrameDescriber = Callable[[np.ndarray, np.ndarray], Sequence[str]]
"""Extension point: `(frames [F, H, W, 3] uint8, timestamps [F]) -> one description per frame`."""


@dataclass
class CrossModalReport:
    """What a run produced; written to `crossmodal_report.json`."""

    videos: int = 0
    videos_with_records: int = 0
    videos_resumed: int = 0
    records: int = 0
    skipped_videos: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    transcript_source: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {"videos": self.videos, "videos_with_records": self.videos_with_records,
                "videos_resumed": self.videos_resumed, "records": self.records,
                "skipped_videos": dict(sorted(self.skipped_videos.items())),
                "dropped": dict(sorted(self.dropped.items())),
                "transcript_source": dict(sorted(self.transcript_source.items()))}


def find_videos(folder: str | os.PathLike) -> list[Path]:
    """Video files (`VIDEO_SUFFIXES`, any case) anywhere under `folder`, sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"--videos {folder}: not a folder")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)


def _video_key(video: Path, root: Path) -> str:
    rel = video.relative_to(root).with_suffix("").as_posix()
    return re.sub(r"[^A-Za-z0-9._-]+", "_", rel).strip("_") or "video"


def _write_json_atomic(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(value, ensure_ascii=False, indent=1))


def _read_cache(path: Path) -> dict | None:
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return cached if isinstance(cached, dict) and cached.get("version") == CACHE_VERSION else None


def _process_video(
    video: Path, key: str, out: Path, *, generator: QAGenerator, prompts: Prompts, transcriber: Transcriber | None,
    num_frames: int, questions_per_video: int, describe_frames: FrameDescriber | None,
) -> dict:
    """One video -> its cache entry (`records`, `dropped`, or `skipped` with a reason; never raises OmniolaError)."""
    from ..media import load_video

    entry: dict[str, Any] = {"version": CACHE_VERSION, "video": str(video), "records": [], "dropped": {}}
    subtitles = find_subtitles(video)
    if subtitles is None and transcriber is None:
        return {**entry, "skipped": "no_subtitles"}
    try:
        clip = load_video(video, num_frames=num_frames, with_audio=True)
    except MediaError as err:
        logger.warning("%s", err)
        return {**entry, "skipped": "media_error"}
    if clip.audio is None:
        return {**entry, "skipped": "no_audio"}
    if subtitles is not None:
        try:
            cues = read_subtitles(subtitles)
        except SubtitleError as err:
            logger.warning("%s", err)
            return {**entry, "skipped": "bad_subtitles"}
        entry["transcript_source"] = "subtitles"
    else:
        try:
            cues = transcriber(clip.audio, 16000)
        except OmniolaError:  # a missing transcriber model stops the run
            raise
        except Exception as err:  # noqa: BLE001 -- a third-party ASR failure skips one video, counted
            logger.warning("%s: transcription failed: %s", video, err)
            return {**entry, "skipped": "transcription_error"}
        entry["transcript_source"] = "transcriber"
    if not cues:
        return {**entry, "skipped": "empty_transcript"}

    descriptions = list(describe_frames(clip.frames, clip.timestamps)) if describe_frames else []
    frames = "\n".join(f"frame {i + 1} at {t:.1f} s" + (f": {descriptions[i]}" if i < len(descriptions) else "")
                       for i, t in enumerate(clip.timestamps))
    user = prompts.render(video_name=video.name, duration=f"{clip.duration:.1f}", num_questions=questions_per_video,
                          transcript=format_transcript(cues), frames=frames)
    try:
        reply = generator(prompts.system, user)
    except Exception as err:  # noqa: BLE001 -- network/endpoint errors: counted, the video is retried next run
        logger.warning("%s: the generator failed: %s", video, err)
        return {**entry, "skipped": "generator_error", "retry": True}
    try:
        items = parse_qa_pairs(reply)
    except GenerationParseError:
        return {**entry, "dropped": {"unparsable_generation": 1}}
    pairs, dropped = clean_pairs(items, limit=questions_per_video)
    rel = os.path.relpath(video.resolve(), out.resolve())
    entry["records"] = [
        {"id": f"{key}_{i}", "video": rel, "audio": rel,
         "conversations": [{"from": "human", "value": HUMAN_PREFIX + question},
                           {"from": "gpt", "value": answer}]}
        for i, (question, answer) in enumerate(pairs)
    ]
    entry["dropped"] = dict(dropped)
    return entry


def build_crossmodal(
    videos_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    generator: QAGenerator,
    prompts: Prompts | None = None,
    transcriber: Transcriber | None = None,
    num_frames: int = 8,
    questions_per_video: int = 3,
    describe_frames: FrameDescriber | None = None,
    progress: Callable[[str], None] | None = None,
) -> CrossModalReport:
    """Builds cross-modal QA records for every video under `videos_dir` into `out` (see the module docstring).

    Args:
        videos_dir: Folder searched recursively for videos and their sibling subtitles.
        out: Output folder: `crossmodal.json`, `crossmodal_report.json` and `cache/` (resumed when present).
        generator: The QA-writing LLM.
        prompts: System prompt and user template (default: the packaged `crossmodal_prompts.txt`).
        transcriber: Used for videos without subtitles; `None` skips them (`no_subtitles`).
        num_frames: Frames sampled per video; their timestamps go into the prompt.
        questions_per_video: Pairs asked for and kept at most per video.
        describe_frames: Optional hook giving a text description per sampled frame.
        progress: Called with each video's key when it is done.

    Returns:
        The counts also written to `crossmodal_report.json`.

    Raises:
        InputError: `videos_dir` is not a folder or a count is not positive.
        ConfigError: the transcriber's model cannot be loaded (videos finished so far stay cached).
    """
    if num_frames < 1 or questions_per_video < 1:
        raise InputError(f"num_frames and questions_per_video must be >= 1, got {num_frames}, {questions_per_video}")
    videos_dir, out = Path(videos_dir), Path(out)
    prompts = prompts or load_prompts()
    videos = find_videos(videos_dir)
    cache_dir = out / "cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    report = CrossModalReport(videos=len(videos))
    records: list[dict] = []
    for video in videos:
        key = _video_key(video, videos_dir)
        cache_path = cache_dir / f"{key}.json"
        entry = _read_cache(cache_path)
        if entry is not None:
            report.videos_resumed += 1
        else:
            entry = _process_video(video, key, out, generator=generator, prompts=prompts, transcriber=transcriber,
                                   num_frames=num_frames, questions_per_video=questions_per_video,
                                   describe_frames=describe_frames)
            if not entry.get("retry"):
                _write_json_atomic(cache_path, entry)
        if entry.get("skipped"):
            report.skipped_videos[entry["skipped"]] += 1
        if entry.get("transcript_source"):
            report.transcript_source[entry["transcript_source"]] += 1
        report.dropped.update(entry.get("dropped", {}))
        records.extend(entry["records"])
        report.videos_with_records += bool(entry["records"])
        if progress:
            progress(key)
    report.records = len(records)
    _write_json_atomic(out / "crossmodal.json", records)
    _write_json_atomic(out / "crossmodal_report.json", report.to_dict())
    return report
