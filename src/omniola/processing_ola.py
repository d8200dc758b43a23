"""OlaProcessor: chat messages with images, videos and audio -> model inputs, with the token budget known up front.

The processor owns the token budget: each `<image>`, `<video>` and `<audio>` marker in the text is expanded to exactly
as many placeholder tokens as the model will produce embeddings for that item, using the connectors' own counting
functions. Sequence lengths are therefore known before the model runs.

Media arrive as:
- images: native-resolution views cut into flattened patches, `pixel_values [N, 3 * p * p]` + `image_grid_hw`;
- videos: uniformly sampled frames at a lower resolution, `pixel_values_videos` + `video_grid_thw [videos, 3]`;
- audio: 30 s chunks of Whisper log-mel, `input_features [chunks, mels, T]` zero-padded to the longest chunk,
  `feature_attention_mask [chunks, T]`, `audio_num_chunks [clips]` (+ raw waveforms for BEATs).
"""

from __future__ import annotations

import bisect
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, BatchFeature, PreTrainedTokenizerBase, WhisperFeatureExtractor

from . import ola_compat
from .errors import ConfigError, InputError
from .media import MediaLimits, VideoClip, load_audio, load_image, load_video
from .modeling.audio import whisper_output_length
from .modeling.connectors import audio_connector_class, vision_connector_class

PROCESSOR_CONFIG_NAME = "processor_config.json"
IMAGE_TOKEN, VIDEO_TOKEN, AUDIO_TOKEN = "<image>", "<video>", "<audio>"
SOUND_TRACK_PLACES = ("after_frames", "before_frames", "interleaved")
SAMPLING_RATE = 16000
CHUNK_SECONDS = 30
HOP_LENGTH = 160  # Whisper log-mel hop: 100 frames per second
# A marker string typed inside a message's text is text, not media: `apply_chat_template` wraps it between these two
# private-use characters, and `__call__` tokenizes what is wrapped as plain text (never as the placeholder token).
LITERAL_OPEN, LITERAL_CLOSE = "\ue000", "\ue001"
_LITERAL_SPAN = f"{LITERAL_OPEN}.*?{LITERAL_CLOSE}"
_LITERAL = re.compile(_LITERAL_SPAN, re.S)

# ChatML, used when the tokenizer brings no chat template of its own (Qwen2's `qwen_1_5` style).
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass
class OlaProcessorSettings:
    """Every knob of the processor; saved to `processor_config.json`.

    Args:
        patch_size: Vision patch side in pixels (from the vision tower).
        grid_multiple: Patch grids are rounded to multiples of this (2 for Ola's 2x2 pooling).
        image_views: `"global+native"` or `"native"` (must match the model config).
        global_view_pixels: Area of the low-resolution global view (Ola: 384 * 384).
        image_min_pixels / image_max_pixels: Bounds on the native view's area; larger images are resized down.
        video_min_pixels / video_max_pixels: Bounds on each video frame's area (Ola: 288^2 .. 480^2).
        video_num_frames: Frames sampled uniformly from a video.
        max_video_seconds: Longer videos are sampled within their first `max_video_seconds` (with a warning).
        use_audio_in_video: Feed a video's own sound track as an audio item beside its frames (Ola does).
        video_sound_track: Where that audio item goes: `"after_frames"` (Ola's inference), `"before_frames"` (the
            order of Ola's training records, `<speech>` before the video, which the default tiny model learned) or
            `"interleaved"` (not Ola's: each frame's tokens are followed by the sound track's tokens from that
            frame's time to the next frame's, as Qwen2.5-Omni interleaves audio and video by time; in the text a
            `<video>` marker directly followed by `<audio>` is a video and its track, interleaved so).
        max_audio_seconds: Longer audio is truncated with a warning (Ola keeps 25 chunks: 750 s).
        audio_padding: `"variable"` (each chunk at its own length) or `"fixed"` (every chunk padded to 30 s).
        image_mean / image_std: Pixel normalisation (SigLIP: 0.5 / 0.5).
        vision_connector / audio_connector: The model's connector specs (they count tokens).
        use_beats: Also return raw waveforms (`audio_values`) for a BEATs encoder.
        system_prompt: System message put before conversations that bring none (`None`: the chat template's own
            default; `""`: an empty system turn, which saves SmolLM2's 16-token default on every sample).
        preprocessing: `"native"` (omniola's) or `"ola"`: the original Ola preprocessing that converted Ola
            checkpoints were trained with (see `omniola.ola_compat`): padded high-res + 384^2-area low-res image
            views, padded/resized video frames (sides multiples of 64), whisper's exact log-mel of 30 s chunks,
            the `qwen_1_5` chat template and the original prompt layout. Uses `image_max_pixels`,
            `image_min_pixels`, `global_view_pixels`, `video_min_pixels` and `video_max_pixels` as Ola's
            MAXRES^2, MINRES^2, LOWRES_RESIZE^2, VIDEO_MINRES^2 and VIDEO_MAXRES^2; needs `audio_padding="fixed"`.
    """

    patch_size: int = 16
    grid_multiple: int = 2
    image_views: str = "global+native"
    global_view_pixels: int = 384 * 384
    image_min_pixels: int = 32 * 32
    image_max_pixels: int = 1536 * 1536
    video_min_pixels: int = 288 * 288
    video_max_pixels: int = 480 * 480
    video_num_frames: int = 8
    max_video_seconds: float | None = None
    use_audio_in_video: bool = True
    video_sound_track: str = "after_frames"
    max_audio_seconds: float = 750.0
    audio_padding: str = "variable"
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    vision_connector: dict = field(default_factory=lambda: {"type": "ola_pooling"})
    audio_connector: dict = field(default_factory=lambda: {"type": "ola_concat", "frames_per_token": 5})
    use_beats: bool = False
    preprocessing: str = "native"
    system_prompt: str | None = None

    def __post_init__(self):
        if self.image_views not in ("global+native", "native"):
            raise InputError(f"image_views must be 'global+native' or 'native', got {self.image_views!r}")
        if self.audio_padding not in ("variable", "fixed"):
            raise InputError(f"audio_padding must be 'variable' or 'fixed', got {self.audio_padding!r}")
        if self.preprocessing not in ("native", "ola"):
            raise InputError(f"preprocessing must be 'native' or 'ola', got {self.preprocessing!r}")
        if self.preprocessing == "ola" and (self.audio_padding != "fixed" or self.image_views != "global+native"):
            raise InputError("preprocessing='ola' needs audio_padding='fixed' and image_views='global+native'")
        if self.video_sound_track not in SOUND_TRACK_PLACES:
            raise InputError(f"video_sound_track must be one of {list(SOUND_TRACK_PLACES)}, "
                             f"got {self.video_sound_track!r}")
        if self.preprocessing == "ola" and self.video_sound_track == "interleaved":
            raise InputError("preprocessing='ola' keeps the original prompt layout; video_sound_track='interleaved' "
                             "is omniola's")
        if self.video_num_frames < 1:
            raise InputError(f"video_num_frames must be >= 1, got {self.video_num_frames}")
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)


def fit_size(width: int, height: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Size closest to `width x height`, same aspect ratio, sides multiples of `factor`, area within bounds.

    Returns:
        `(new_width, new_height)`.
    """
    if width < 1 or height < 1:
        raise InputError(f"image has no pixels ({width}x{height})")
    scale = 1.0
    if width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
    elif width * height < min_pixels:
        scale = math.sqrt(min_pixels / (width * height))
    w = max(factor, round(width * scale / factor) * factor)
    h = max(factor, round(height * scale / factor) * factor)
    if w * h > max_pixels:  # rounding up overshot: round down instead
        w = max(factor, math.floor(width * scale / factor) * factor)
        h = max(factor, math.floor(height * scale / factor) * factor)
    return w, h


def patchify(image: Image.Image, size: tuple[int, int], patch: int, mean, std) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resizes an RGB image to `size` (w, h) and cuts it into flattened patches.

    Returns:
        `([gh * gw, 3 * patch * patch], (gh, gw))`, patches row-major, each flattened channel-first.
    """
    if image.size != size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255.0  # (3, H, W)
    x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    c, h, w = x.shape
    gh, gw = h // patch, w // patch
    x = x.reshape(c, gh, patch, gw, patch).permute(1, 3, 0, 2, 4)  # (gh, gw, 3, p, p)
    return x.reshape(gh * gw, c * patch * patch), (gh, gw)


class OlaProcessor:
    """Tokenizer + image/video/audio preprocessing for `OlaForConditionalGeneration`."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        feature_extractor: WhisperFeatureExtractor | None = None,
        settings: OlaProcessorSettings | None = None,
        *,
        limits: MediaLimits | None = None,
        **overrides,
    ):
        """Args:
            tokenizer, feature_extractor, settings: see the class; `overrides` replace fields of `settings`.
            limits: bounds on the media this processor decodes, checked before decoding (default:
                `MediaLimits()`); a runtime policy, not saved with the processor.
        """
        self.tokenizer = tokenizer
        self.limits = limits or MediaLimits()
        self.feature_extractor = feature_extractor
        self.settings = settings or OlaProcessorSettings()
        if overrides:
            self.settings = OlaProcessorSettings(**{**asdict(self.settings), **overrides})
        s = self.settings
        self._vision_cls, self._vision_options = vision_connector_class(s.vision_connector)
        self._audio_cls, self._audio_options = audio_connector_class(s.audio_connector)
        if s.video_sound_track == "interleaved" and not self._audio_cls.tokens_in_time_order:
            raise ConfigError(f"video_sound_track='interleaved' needs audio tokens in time order; the "
                              f"{s.audio_connector.get('type')!r} audio connector's tokens are not")
        if s.preprocessing == "ola":  # the original qwen_1_5 prompt, whatever template the Qwen tokenizer brings
            tokenizer.chat_template = ola_compat.CHAT_TEMPLATE
        elif tokenizer.chat_template is None:
            tokenizer.chat_template = CHATML_TEMPLATE
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        ids = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, VIDEO_TOKEN, AUDIO_TOKEN])
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
            raise InputError(
                f"the tokenizer lacks the placeholder tokens {IMAGE_TOKEN} {VIDEO_TOKEN} {AUDIO_TOKEN}; "
                "add them with tokenizer.add_special_tokens (omniola build does)"
            )
        self.image_token_id, self.video_token_id, self.audio_token_id = ids

    # ----------------------------------------------------------------------------------------------- persistence
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides) -> OlaProcessor:
        path = Path(path)
        config_file = path / PROCESSOR_CONFIG_NAME
        if not config_file.is_file():
            raise InputError(f"{config_file} is missing: {path} is not an omniola model/processor directory")
        settings = OlaProcessorSettings(**{**json.loads(config_file.read_text()), **overrides})
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise InputError(f"{path} has no usable tokenizer files ({type(err).__name__}); copy the LLM's "
                             "tokenizer there or convert with --tokenizer DIR") from err
        feature_extractor = None
        if (path / "preprocessor_config.json").is_file():
            feature_extractor = WhisperFeatureExtractor.from_pretrained(path)
        return cls(tokenizer, feature_extractor, settings)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        if self.feature_extractor is not None:
            self.feature_extractor.save_pretrained(path)
        (path / PROCESSOR_CONFIG_NAME).write_text(json.dumps(asdict(self.settings), indent=2) + "\n")

    # ------------------------------------------------------------------------------------------- token counting
    def _image_view_sizes(self, width: int, height: int) -> list[tuple[int, int]]:
        s = self.settings
        if s.preprocessing == "ola":
            return ola_compat.image_view_sizes(width, height, max_pixels=s.image_max_pixels,
                                               min_pixels=s.image_min_pixels, lowres_pixels=s.global_view_pixels)
        factor = s.patch_size * s.grid_multiple
        native = fit_size(width, height, factor, s.image_min_pixels, s.image_max_pixels)
        if s.image_views == "native":
            return [native]
        glob = fit_size(width, height, factor, s.global_view_pixels, s.global_view_pixels)
        return [glob, native]

    def num_image_tokens(self, width: int, height: int) -> int:
        """LLM tokens of one `width x height` image."""
        p = self.settings.patch_size
        grids = [(h // p, w // p) for w, h in self._image_view_sizes(width, height)]
        return self._vision_cls.num_image_tokens(grids, self._vision_options)

    def num_audio_tokens(self, num_samples: int) -> int:
        """LLM tokens of one clip of `num_samples` 16 kHz samples."""
        frames = [whisper_output_length(padded // HOP_LENGTH) for _, padded in self._chunk_lengths(num_samples)]
        return self._audio_cls.num_audio_tokens(frames, self._audio_options)

    # --------------------------------------------------------------------------------------------------- images
    def _process_images(self, images: list) -> dict[str, torch.Tensor]:
        s = self.settings
        patches, grids = [], []
        for image in images:
            image = load_image(image, limits=self.limits)
            if s.preprocessing == "ola":  # views already at their final size
                views = ola_compat.image_views(image, max_pixels=s.image_max_pixels, min_pixels=s.image_min_pixels,
                                               lowres_pixels=s.global_view_pixels)
                views = [(view, view.size) for view in views]
            else:
                views = [(image, size) for size in self._image_view_sizes(*image.size)]
            for view, size in views:
                x, grid = patchify(view, size, s.patch_size, s.image_mean, s.image_std)
                patches.append(x)
                grids.append(grid)
        return {"pixel_values": torch.cat(patches), "image_grid_hw": torch.tensor(grids, dtype=torch.long)}

    # --------------------------------------------------------------------------------------------------- videos
    def load_video(self, video, *, with_audio: bool | None = None, limits: MediaLimits | None = None) -> VideoClip:
        """Decodes a video path or bytes (or passes a `VideoClip` / `[F, H, W, 3]` uint8 array through).

        `with_audio`: also decode a file's sound track (default: the `use_audio_in_video` setting).
        `limits`: bounds checked from the container before decoding (default: the processor's `limits`).
        """
        s = self.settings
        limits = limits or self.limits
        if isinstance(video, VideoClip):
            return video
        if isinstance(video, np.ndarray):
            if video.ndim != 4 or video.shape[-1] != 3 or video.shape[0] == 0:
                raise InputError(f"a video array must be [frames, H, W, 3] uint8, got shape {video.shape}")
            limits.check_image(video.shape[2], video.shape[1], "<video array>", kind="video frame")
            return VideoClip(frames=video, timestamps=np.arange(len(video), dtype=np.float64), duration=0.0,
                             audio=None)
        return load_video(
            video,
            num_frames=s.video_num_frames,
            with_audio=s.use_audio_in_video if with_audio is None else with_audio,
            sampling_rate=SAMPLING_RATE,
            max_seconds=s.max_video_seconds,
            limits=limits,
        )

    def _video_size(self, clip: VideoClip) -> tuple[int, int]:
        s = self.settings
        _, h, w, _ = clip.frames.shape
        if s.preprocessing == "ola":
            return ola_compat.video_frame_size(w, h, min_pixels=s.video_min_pixels, max_pixels=s.video_max_pixels)
        return fit_size(w, h, s.patch_size * s.grid_multiple, s.video_min_pixels, s.video_max_pixels)

    def num_video_tokens(self, clip: VideoClip) -> int:
        w, h = self._video_size(clip)
        p = self.settings.patch_size
        return self._vision_cls.num_video_tokens(len(clip.frames), (h // p, w // p), self._vision_options)

    def _process_videos(self, clips: list[VideoClip]) -> dict[str, torch.Tensor]:
        s = self.settings
        patches, thw = [], []
        for clip in clips:
            size = self._video_size(clip)
            for frame in clip.frames:
                image = Image.fromarray(frame)
                if s.preprocessing == "ola":  # padded, or resized, to multiples of 64 (== size)
                    image = ola_compat.video_frame(image, min_pixels=s.video_min_pixels, max_pixels=s.video_max_pixels)
                x, (gh, gw) = patchify(image, size, s.patch_size, s.image_mean, s.image_std)
                patches.append(x)
            thw.append((len(clip.frames), gh, gw))
        return {"pixel_values_videos": torch.cat(patches), "video_grid_thw": torch.tensor(thw, dtype=torch.long)}

    # ---------------------------------------------------------------------------------------------------- audio
    def _chunk_lengths(self, num_samples: int) -> list[tuple[int, int]]:
        """`(samples taken, padded length)` of each chunk: 30 s chunks, each padded to 30 s (fixed) or to a whole
        number of LLM tokens (variable)."""
        limit = CHUNK_SECONDS * SAMPLING_RATE
        if self.settings.audio_padding == "fixed":
            unit = limit
        else:  # mel hop * conv stride 2 * frames per token: no frame is dropped by the connector
            unit = HOP_LENGTH * 2 * self._audio_cls.frames_per_token(self._audio_options)
        lengths = []
        for start in range(0, max(num_samples, 1), limit):
            taken = min(limit, num_samples - start)
            lengths.append((taken, math.ceil(max(taken, 1) / unit) * unit))
        return lengths

    def _audio_chunks(self, samples: np.ndarray) -> list[np.ndarray]:
        """The clip cut and padded as `_chunk_lengths` says."""
        limit = CHUNK_SECONDS * SAMPLING_RATE
        return [
            np.pad(samples[i * limit : i * limit + taken], (0, padded - taken)).astype(np.float32)
            for i, (taken, padded) in enumerate(self._chunk_lengths(len(samples)))
        ]

    def load_audio(self, audio, *, limits: MediaLimits | None = None) -> np.ndarray:
        """Reads audio (path, bytes, `(samples, rate)` or 16 kHz array) as 16 kHz mono, truncated to the maximum
        length; `limits` (default: the processor's) are checked from the header first."""
        return load_audio(audio, sampling_rate=SAMPLING_RATE, max_seconds=self.settings.max_audio_seconds,
                          limits=limits or self.limits)

    def _process_audio(self, clips: list[np.ndarray]) -> dict[str, torch.Tensor]:
        if self.feature_extractor is None:
            raise InputError("this processor has no audio feature extractor (the model has no audio encoder)")
        chunks, counts = [], []
        for samples in clips:
            cs = self._audio_chunks(samples)
            chunks += cs
            counts.append(len(cs))
        if self.settings.preprocessing == "ola":  # openai-whisper's log-mel, bit for bit
            n_mels = self.feature_extractor.feature_size
            mels = [ola_compat.log_mel_spectrogram(c, n_mels).numpy() for c in chunks]
        else:
            mels = [
                self.feature_extractor(c, sampling_rate=SAMPLING_RATE, padding="longest", return_tensors="np")[
                    "input_features"
                ][0]
                for c in chunks
            ]  # each (M, T_i)
        t_max = max(m.shape[1] for m in mels)
        features = torch.zeros(len(mels), mels[0].shape[0], t_max)
        mask = torch.zeros(len(mels), t_max, dtype=torch.long)
        for i, m in enumerate(mels):
            features[i, :, : m.shape[1]] = torch.from_numpy(m)
            mask[i, : m.shape[1]] = 1
        out = {
            "input_features": features,
            "feature_attention_mask": mask,
            "audio_num_chunks": torch.tensor(counts, dtype=torch.long),
        }
        if self.settings.use_beats:
            s_max = max(len(c) for c in chunks)
            values = torch.zeros(len(chunks), s_max)
            values_mask = torch.zeros(len(chunks), s_max, dtype=torch.long)
            for i, c in enumerate(chunks):
                values[i, : len(c)] = torch.from_numpy(c)
                values_mask[i, : len(c)] = 1
            out.update(audio_values=values, audio_values_mask=values_mask)
        return out

    # ----------------------------------------------------------------------------------------------------- call
    def __call__(
        self,
        text: str | list[str],
        images: list | None = None,
        videos: list | None = None,
        audio: list | None = None,
        *,
        label_spans: list[list[tuple[int, int]]] | None = None,
        padding_side: str = "left",
        return_tensors: str = "pt",
    ) -> BatchFeature:
        """Tokenizes `text` with its `<image>`, `<video>`, `<audio>` markers expanded, and preprocesses the media.

        Args:
            text: One prompt or a batch. Media markers appear once per item.
            images: Images (path, PIL image or HWC array) in the order of `<image>` markers over the whole batch.
            videos: Videos (path, `VideoClip` or `[F, H, W, 3]` uint8) in the order of `<video>` markers.
            audio: Audio (path, `(samples, rate)` or 16 kHz array) in the order of `<audio>` markers.
            label_spans: For training: per text, `(start, end)` character spans (in `text`, before expansion)
                whose tokens are learned; `labels` is returned with -100 everywhere else.
            padding_side: `"left"` for generation, `"right"` for training.

        Raises:
            InputError: markers and media disagree in number.
            MediaError: a media file is missing or unreadable.
        """
        texts = [text] if isinstance(text, str) else list(text)
        images = [load_image(i, limits=self.limits) for i in images or []]
        clips = [self.load_video(v) for v in videos or []]
        audio = [self.load_audio(a) for a in audio or []]
        for marker, items, name in ((IMAGE_TOKEN, images, "images"), (VIDEO_TOKEN, clips, "videos"),
                                    (AUDIO_TOKEN, audio, "audio")):
            n = sum(_LITERAL.sub("", t).count(marker) for t in texts)
            if n != len(items):
                raise InputError(f"the text has {n} {marker} marker(s) but {len(items)} {name} were given")

        items = {IMAGE_TOKEN: iter(images), VIDEO_TOKEN: iter(clips), AUDIO_TOKEN: iter(audio)}
        expanded, shifts = zip(*(self._expand(t, items) for t in texts))
        encoded = self._tokenize(list(expanded), padding_side, offsets=label_spans is not None)
        data: dict[str, Any] = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        if label_spans is not None:
            data["labels"] = self._labels(encoded, label_spans, shifts)
        if images:
            data.update(self._process_images(images))
        if clips:
            data.update(self._process_videos(clips))
        if audio:
            data.update(self._process_audio(audio))
        return BatchFeature(data, tensor_type=return_tensors)

    def _expand(self, text: str, items: dict) -> tuple[str, list[tuple[int, int]]]:
        """Replaces each marker with as many copies as its item (drawn in order from `items`) has tokens, in one
        pass so nothing is re-matched; with `video_sound_track="interleaved"`, `<video><audio>` becomes
        `_interleaved`'s run.

        Returns:
            The expanded text and `(end of marker in text, shift after it)` pairs to map character positions.
        """
        pair = VIDEO_TOKEN + AUDIO_TOKEN if self.settings.video_sound_track == "interleaved" else None
        markers = [pair] if pair else []
        markers += [IMAGE_TOKEN, VIDEO_TOKEN, AUDIO_TOKEN]
        out, shifts, pos, shift = [], [], 0, 0
        pattern = "(" + "|".join([_LITERAL_SPAN, *map(re.escape, markers)]) + ")"  # literal spans stay text
        for part in re.split(pattern, text, flags=re.S):
            pos += len(part)
            if part == pair:
                run = self._interleaved(next(items[VIDEO_TOKEN]), next(items[AUDIO_TOKEN]))
            elif part == IMAGE_TOKEN:
                run = part * self.num_image_tokens(*next(items[part]).size)
            elif part == VIDEO_TOKEN:
                run = part * self.num_video_tokens(next(items[part]))
            elif part == AUDIO_TOKEN:
                run = part * self.num_audio_tokens(len(next(items[part])))
            else:
                out.append(part)
                continue
            shift += len(run) - len(part)
            shifts.append((pos, shift))
            out.append(run)
        return "".join(out), shifts

    def _interleaved(self, clip: VideoClip, samples: np.ndarray) -> str:
        """The placeholders of a video and its sound track as one run, in time order: the video's begin token,
        then for each frame its tokens (and separator) followed by the audio tokens whose time lies between this
        frame's timestamp and the next one's, the video's end token after the last frame's. The audio's begin
        token and any sound before the second frame follow the first frame; its newline(s) and end token, and
        sound after the last frame, follow the last. Both modalities keep their own token order, so the model
        scatters them unchanged; only their positions interleave."""
        frames = len(clip.frames)
        total = self.num_video_tokens(clip)
        per_frame, rest = divmod(total - 2, frames)
        if rest:
            raise ConfigError(f"video_sound_track='interleaved' needs the video layout [begin, frame tokens..., end]; "
                              f"the {self.settings.vision_connector.get('type')!r} connector gives {total} tokens "
                              f"for {frames} frames")
        video = [per_frame] * frames
        video[0] += 1
        video[-1] += 1
        times = self._audio_token_times(len(samples))
        after = np.bincount(np.searchsorted(np.asarray(clip.timestamps[1:]), times, side="right"),
                            minlength=frames)
        return "".join(VIDEO_TOKEN * v + AUDIO_TOKEN * int(a) for v, a in zip(video, after))

    def _audio_token_times(self, num_samples: int) -> np.ndarray:
        """Time in seconds of each of a clip's audio tokens (`num_audio_tokens` of them): a chunk's tokens spread
        evenly over its (padded) length, each at the centre of what it covers; the begin token at -inf, a chunk's
        newline at the chunk's end, the end token at +inf."""
        times = [-math.inf]
        for c, (_, padded) in enumerate(self._chunk_lengths(num_samples)):
            n = self._audio_cls.num_audio_tokens([whisper_output_length(padded // HOP_LENGTH)], self._audio_options) - 3
            start, seconds = c * CHUNK_SECONDS, padded / SAMPLING_RATE
            times += list(start + (np.arange(n) + 0.5) * seconds / n) + [start + seconds]
        return np.asarray(times + [math.inf])

    def _tokenize(self, texts: list[str], padding_side: str, *, offsets: bool) -> dict[str, torch.Tensor]:
        """Token ids, attention mask (and character offsets) of `texts`, padded into one batch.

        Spans between `LITERAL_OPEN` and `LITERAL_CLOSE` (marker strings a user typed) are tokenized as plain text,
        so they never become placeholder tokens; the two wrapping characters get no tokens of their own.
        """
        if not any(LITERAL_OPEN in t for t in texts):
            return self.tokenizer(texts, padding=True, padding_side=padding_side, add_special_tokens=False,
                                  return_tensors="pt", return_offsets_mapping=offsets)
        rows = []
        for text in texts:
            ids, spans, pos = [], [], 0
            for i, segment in enumerate(re.split(f"{LITERAL_OPEN}(.*?){LITERAL_CLOSE}", text, flags=re.S)):
                literal = i % 2 == 1  # re.split puts the captured (literal) spans at odd indices
                start = pos + literal
                if segment:
                    enc = self.tokenizer(segment, add_special_tokens=False, split_special_tokens=literal,
                                         return_offsets_mapping=True)
                    ids += enc["input_ids"]
                    spans += [(a + start, b + start) for a, b in enc["offset_mapping"]]
                pos = start + len(segment) + literal
            rows.append((ids, spans))
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
        offset_mapping = torch.zeros(len(rows), width, 2, dtype=torch.long)
        for b, (ids, spans) in enumerate(rows):
            where = slice(width - len(ids), width) if padding_side == "left" else slice(0, len(ids))
            input_ids[b, where] = torch.tensor(ids, dtype=torch.long)
            attention_mask[b, where] = 1
            if spans:
                offset_mapping[b, where] = torch.tensor(spans, dtype=torch.long)
        out = {"input_ids": input_ids, "attention_mask": attention_mask}
        if offsets:
            out["offset_mapping"] = offset_mapping
        return out

    @staticmethod
    def _labels(encoded, label_spans, shifts) -> torch.Tensor:
        """`input_ids` where a token starts inside a label span, -100 elsewhere (prompt, placeholders, padding)."""
        ids = encoded["input_ids"]
        labels = torch.full_like(ids, -100)
        for b, (spans, sample_shifts) in enumerate(zip(label_spans, shifts)):
            ends = [end for end, _ in sample_shifts]

            def moved(x: int) -> int:
                i = bisect.bisect_right(ends, x)
                return x + (sample_shifts[i - 1][1] if i else 0)

            starts, stops = encoded["offset_mapping"][b].unbind(-1)
            real = (encoded["attention_mask"][b] == 1) & (stops > starts)
            for start, end in spans:
                keep = real & (starts >= moved(start)) & (starts < moved(end))
                labels[b, keep] = ids[b, keep]
        return labels

    # --------------------------------------------------------------------------------------------- chat template
    def apply_chat_template(
        self,
        conversation: list[dict] | list[list[dict]],
        *,
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        return_dict: bool = True,
        return_tensors: str = "pt",
        padding_side: str = "left",
        use_audio_in_video: bool | None = None,
        return_labels: bool = False,
    ) -> BatchFeature | str | list[str]:
        """Renders chat messages whose `content` is a string or a list of typed parts and prepares the inputs.

        Only typed parts become media: a `<image>`, `<video>` or `<audio>` string inside a text is text.

        Parts: `{"type": "text", "text": ...}`, `{"type": "image", "image": path | PIL.Image | array}`,
        `{"type": "video", "video": path}`, `{"type": "audio", "audio": path | (array, rate)}`.
        A video's own sound track is added as audio right after it (or right before it, see the
        `video_sound_track` setting) when `use_audio_in_video` (default: the processor setting).

        With `return_labels=True` (training), `labels` holds the tokens of every assistant message (including its
        end-of-turn token) and -100 elsewhere.

        Returns:
            A `BatchFeature` (tokenize and return_dict), the token ids, or the rendered prompt string(s).
        """
        batched = bool(conversation) and isinstance(conversation[0], list)
        conversations = conversation if batched else [conversation]
        use_av = self.settings.use_audio_in_video if use_audio_in_video is None else use_audio_in_video
        texts, spans, images, videos, audio = [], [], [], [], []
        for conv in conversations:
            messages = []
            for m_idx, message in enumerate(conv):
                if not isinstance(message, dict) or "role" not in message:
                    raise InputError(f"message {m_idx} must be a dict with 'role' and 'content', got {message!r:.80}")
                content = message.get("content", "")
                if isinstance(content, str):
                    messages.append({"role": message["role"], "content": _escape_markers(content)})
                    continue
                pieces = []
                for p_idx, part in enumerate(content):
                    kind = part.get("type") if isinstance(part, dict) else None
                    where = f"message {m_idx} part {p_idx}"
                    if kind == "text":
                        pieces.append(_escape_markers(str(part.get("text", ""))))
                    elif kind == "image":
                        images.append(load_image(self._media(part, "image", where), limits=self.limits))
                        pieces.append(IMAGE_TOKEN)
                    elif kind == "video":
                        # decode the sound track whenever this call uses it, whatever the setting
                        clip = self.load_video(self._media(part, "video", where), with_audio=use_av)
                        videos.append(clip)
                        pieces.append(VIDEO_TOKEN)
                        if use_av and clip.audio is not None and len(clip.audio):
                            audio.append(clip.audio)
                            place = self.settings.video_sound_track
                            if place == "before_frames":
                                pieces.insert(len(pieces) - 1, AUDIO_TOKEN)
                            elif place == "interleaved":  # one run: see `_interleaved`
                                pieces[-1] = VIDEO_TOKEN + AUDIO_TOKEN
                            else:
                                pieces.append(AUDIO_TOKEN)
                    elif kind == "audio":
                        audio.append(self.load_audio(self._media(part, "audio", where)))
                        pieces.append(AUDIO_TOKEN)
                    else:
                        raise InputError(
                            f"{where}: unsupported content part type {kind!r}; use text, image, video or audio"
                        )
                if self.settings.preprocessing == "ola":  # infer.py's prompt layout, visual before audio
                    text = ola_compat.user_content(pieces, IMAGE_TOKEN, VIDEO_TOKEN, AUDIO_TOKEN)
                else:
                    text = "\n".join(pieces)
                messages.append({"role": message["role"], "content": text})
            texts.append(self._render(messages, add_generation_prompt and not return_labels))
            if return_labels:
                spans.append(self._answer_spans(messages, texts[-1]))
        if not tokenize:
            return texts if batched else texts[0]
        inputs = self(texts, images=images, videos=videos, audio=audio, padding_side=padding_side,
                      return_tensors=return_tensors, label_spans=spans if return_labels else None)
        return inputs if return_dict else inputs["input_ids"]

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if self.settings.system_prompt is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.settings.system_prompt}, *messages]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False)

    def _answer_spans(self, messages: list[dict], full: str) -> list[tuple[int, int]]:
        """Character spans of the assistant turns in the rendered `full` text."""
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            if not message["content"].strip():
                raise InputError(f"message {i}: the assistant answer is empty")
            before = self._render(messages[:i], add_generation_prompt=True) if i else ""
            upto = self._render(messages[: i + 1], add_generation_prompt=False)
            if not (upto.startswith(before) and full.startswith(upto)):
                raise InputError("the chat template does not render conversations prefix by prefix; cannot find "
                                 "the assistant turns to build labels")
            spans.append((len(before), len(upto)))
        if not spans:
            raise InputError("return_labels needs at least one assistant message")
        return spans

    @staticmethod
    def _media(part: dict, kind: str, where: str):
        for key in (kind, "path", "url"):
            if part.get(key) is not None:
                return part[key]
        raise InputError(f"{where}: a part of type {kind!r} needs a {kind!r} field")

    def decode(self, *args, **kwargs) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    def batch_decode(self, *args, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def modality_token_counts(self, input_ids: torch.Tensor) -> dict[str, int]:
        """Placeholder tokens per modality and text tokens in a batch of ids."""
        counts = {
            "image": int((input_ids == self.image_token_id).sum()),
            "video": int((input_ids == self.video_token_id).sum()),
            "audio": int((input_ids == self.audio_token_id).sum()),
        }
        counts["text"] = int(input_ids.numel()) - sum(counts.values())
        return counts


def _escape_markers(text: str) -> str:
    """`text` with each media marker wrapped as a literal (see `LITERAL_OPEN`); the wrapping characters themselves
    are private-use code points, replaced by U+FFFD if the text brings them."""
    if LITERAL_OPEN in text or LITERAL_CLOSE in text:
        text = text.replace(LITERAL_OPEN, "\ufffd").replace(LITERAL_CLOSE, "\ufffd")
    for marker in (IMAGE_TOKEN, VIDEO_TOKEN, AUDIO_TOKEN):
        if marker in text:
            text = text.replace(marker, LITERAL_OPEN + marker + LITERAL_CLOSE)
    return text
