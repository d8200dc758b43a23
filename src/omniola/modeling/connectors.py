"""Connectors: from encoder features to embeddings in the LLM's space, plus the token layout around them.

Connectors are chosen by name in the config (`config.vision_connector = {"type": "ola_pooling", ...}`) through two
registries, so a new design is a new class with `@register_vision_connector("name")`, not a change to the model.
Each connector also states how many LLM tokens an item will produce (`num_image_tokens`, `num_video_tokens`,
`num_audio_tokens`): the processor expands placeholders with exactly these counts, and the model checks them.

Registered (vision / audio), with the LLM tokens each item costs and the parameters for the `tiny` vision tower
(C = 192) and Whisper-tiny (C = 384) into a 576-wide LLM (SmolLM2-135M), default options:

    type         image (one h x w view)  video (T frames of h x w)       audio (per 30 s chunk)  params vision / audio
    ola_pooling  h/2 * (w/2 + 1) + 2     T * (h/2 * (w/2 + 1) + 1) + 2   -                       1,442,304 / -
    ola_concat   -                       -                               frames/k + 1            - / 5,116,160
    mlp2x_gelu   h * (w + 1) + 2         T * (h * (w + 1) + 1) + 2       frames/k + 1            445,824 / 1,440,576
    qformer      num_queries + 2         T * (num_queries + 1) + 2       num_queries + 1         1,306,752 / 4,970,496
    upm          h/2 * (w/2 + 1) + 2     T * (h/2 * (w/2 + 1) + 1) + 2   frames/k + 1            596,739 / 2,148,483

An audio clip adds begin and end to its chunks' tokens. An image shown as two views
(`image_views="global+native"`) adds the second view's tokens and a separator, except for `qformer`, whose queries
read both views at once (any resolution, either view mode: `num_queries + 2`).

Notation: C = encoder width, D = LLM hidden size, k = encoder frames per audio token.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

VISION_CONNECTORS: dict[str, type[VisionConnector]] = {}
AUDIO_CONNECTORS: dict[str, type[AudioConnector]] = {}


def _registrar(registry: dict, kind: str) -> Callable:
    def register(name: str):
        def wrap(cls):
            if name in registry:
                raise ConfigError(f"{kind} connector {name!r} is registered twice")
            registry[name] = cls
            cls.connector_name = name
            return cls

        return wrap

    return register


register_vision_connector = _registrar(VISION_CONNECTORS, "vision")
register_audio_connector = _registrar(AUDIO_CONNECTORS, "audio")


def _lookup(registry: dict, kind: str, spec: dict) -> tuple[type, dict]:
    options = dict(spec)
    name = options.pop("type", None)
    if name not in registry:
        raise ConfigError(f"{kind}_connector.type is {name!r}; registered: {sorted(registry)}")
    cls = registry[name]
    if hasattr(cls, "parse_options"):  # declared options: a typo fails here, in the model and the processor alike
        cls.parse_options(options)
    return cls, options


def vision_connector_class(spec: dict) -> tuple[type[VisionConnector], dict]:
    """The class and options named by `config.vision_connector`."""
    return _lookup(VISION_CONNECTORS, "vision", spec)


def audio_connector_class(spec: dict) -> tuple[type[AudioConnector], dict]:
    """The class and options named by `config.audio_connector`."""
    return _lookup(AUDIO_CONNECTORS, "audio", spec)


def _special_embedding(dim: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(dim) / math.sqrt(dim))


class VisionConnector(nn.Module):
    """Interface of vision connectors.

    `forward_images` receives the vision tower's features of every view of every image (`views_per_image`
    consecutive views make one image) and returns one `[tokens, D]` tensor per image; `forward_videos` receives one
    `[frames, h * w, C]` tensor per video.
    """

    connector_name: str

    def __init__(self, vision_hidden_size: int, text_hidden_size: int, **options):
        super().__init__()

    @classmethod
    def num_image_tokens(cls, view_grids: list[tuple[int, int]], options: dict) -> int:
        raise NotImplementedError

    @classmethod
    def num_video_tokens(cls, num_frames: int, grid: tuple[int, int], options: dict) -> int:
        raise NotImplementedError

    def forward_images(
        self, view_features: list[torch.Tensor], view_grids: list[tuple[int, int]], views_per_image: int
    ) -> list[torch.Tensor]:
        raise NotImplementedError

    def forward_videos(self, videos: list[torch.Tensor], grids: list[tuple[int, int]]) -> list[torch.Tensor]:
        raise NotImplementedError

    def spatial_tokens(self, view_features: list[torch.Tensor],
                       view_grids: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Each view's content tokens on their grid, `[rows, cols, D]` (row r, column c covers that part of the
        view): what the `ground` training objective needs. Only connectors whose tokens keep the picture's layout
        have it."""
        raise ConfigError(f"the {type(self).__name__} vision connector's tokens have no grid over the picture, so "
                          "they cannot be grounded to boxes; use ola_pooling")


class LocalGlobalPooling(nn.Module):
    """Ola's attention pooling: each 2x2 window becomes a softmax-weighted sum of its patches, the weights scored
    from each patch concatenated with the window mean (local detail + global context)."""

    def __init__(self, dim: int):
        super().__init__()
        self.predictor = nn.Sequential(nn.Linear(dim * 2, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x [B, H, W, D]` -> `[B, H/2, W/2, D]`."""
        b, h, w, d = x.shape
        windows = x.reshape(b, h // 2, 2, w // 2, 2, d).permute(0, 1, 3, 2, 4, 5)  # (B, H/2, W/2, 2, 2, D)
        windows = windows.reshape(b, h // 2, w // 2, 4, d)  # (B, H/2, W/2, 4, D)
        mean = windows.mean(-2, keepdim=True).expand_as(windows)
        scores = self.predictor(torch.cat([windows, mean], dim=-1))  # (B, H/2, W/2, 4, D)
        return (windows * scores.softmax(dim=-2)).sum(dim=-2)


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """`positions [N]` -> `[N, dim]`: sines and cosines of the positions at `dim / 2` geometric frequencies (1 to
    1/100: the few-dozen rows, columns or frames of a picture or clip are told apart by the fast ones and ordered
    by the slow ones)."""
    half = dim // 2
    freqs = 100.0 ** (-torch.arange(half, dtype=torch.float32) / max(1, half - 1))
    angles = positions.float()[:, None] * freqs[None]
    out = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return F.pad(out, (0, dim - 2 * half))


def sincos_2d(rows: int, cols: int, dim: int) -> torch.Tensor:
    """`[rows, cols, dim]`: the first half of the channels encodes the row, the second half the column."""
    r = sincos_1d(torch.arange(rows), dim // 2)[:, None].expand(rows, cols, dim // 2)
    c = sincos_1d(torch.arange(cols), dim - dim // 2)[None].expand(rows, cols, dim - dim // 2)
    return torch.cat([r, c], dim=-1)


#: `ola_pooling` options: explicit place and time for visual tokens (off in Ola; measured in docs/training.md).
POSITION_EMBEDDINGS = ("none", "sincos2d")
TIME_EMBEDDINGS = ("none", "sincos")


class ScaledCode(nn.Module):
    """Adds fixed codes (values in [-1, 1]: sinusoids of a row, column or frame) to tokens, times a learned
    per-channel gain and each token's own RMS: the code is the same share of every token whatever the connector's
    output scale (Ola's visual tokens are ~10x the LLM's word embeddings). The gain starts at `INIT_GAIN`."""

    INIT_GAIN = 0.5  # codes have RMS 0.71: they start at ~35 % of a token's RMS

    def __init__(self, dim: int):
        super().__init__()
        self.gain = nn.Parameter(torch.full((dim,), self.INIT_GAIN))

    def forward(self, x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        scale = x.detach().pow(2).mean(-1, keepdim=True).sqrt()
        return x + scale * self.gain.to(x.dtype) * codes.to(x.dtype)


@register_vision_connector("ola_pooling")
class OlaPoolingConnector(VisionConnector):
    """Ola's vision connector (`ola_mlp` in the original code).

    Per view: `proj1` -> 2x2 local-global attention pooling -> GELU -> `proj2`, then a learned `image_newline`
    after every row. An image is `[begin, view_1, sep, view_2, end]` (two views) or `[begin, view, end]`; a video is
    `[begin, frame_1, sep, frame_2, sep, ..., frame_T, sep, end]`.

    Options (not in Ola, which tells place and time only through the LLM's 1-D positions, the newlines and the
    separators; each adds `D` parameters and no tokens):
        position_embedding: `"sincos2d"` adds each pooled token's row and column in its view or frame, a fixed 2-D
            sinusoid (:class:`ScaledCode`).
        time_embedding: `"sincos"` adds the frame's index in the video to each of the frame's tokens (its newlines
            and separator too), a fixed sinusoid (:class:`ScaledCode`).
    """

    @classmethod
    def parse_options(cls, options: dict) -> dict:
        choices = {"position_embedding": POSITION_EMBEDDINGS, "time_embedding": TIME_EMBEDDINGS}
        unknown = sorted(set(options) - set(choices))
        if unknown:
            raise ConfigError(f"vision_connector: unknown option(s) {unknown} for type 'ola_pooling'; it accepts "
                              f"{sorted(choices)}")
        for name, value in options.items():
            if value not in choices[name]:
                raise ConfigError(f"vision_connector.{name} must be one of {choices[name]}, got {value!r}")
        return {name: options.get(name, "none") for name in choices}

    def __init__(self, vision_hidden_size: int, text_hidden_size: int, **options):
        super().__init__(vision_hidden_size, text_hidden_size)
        opts = self.parse_options(options)
        d = text_hidden_size
        self.proj1 = nn.Linear(vision_hidden_size, d)
        self.pooler = LocalGlobalPooling(d)
        self.act = nn.GELU()
        self.proj2 = nn.Linear(d, d)
        self.image_newline = _special_embedding(d)
        self.image_begin = _special_embedding(d)
        self.image_end = _special_embedding(d)
        self.image_sep = _special_embedding(d)
        self.position_code = ScaledCode(d) if opts["position_embedding"] != "none" else None
        self.time_code = ScaledCode(d) if opts["time_embedding"] != "none" else None

    @staticmethod
    def _view_tokens(grid: tuple[int, int]) -> int:
        h, w = grid
        return (h // 2) * (w // 2 + 1)

    @classmethod
    def num_image_tokens(cls, view_grids: list[tuple[int, int]], options: dict) -> int:
        # begin + views + separators between views + end
        return sum(cls._view_tokens(g) for g in view_grids) + len(view_grids) - 1 + 2

    @classmethod
    def num_video_tokens(cls, num_frames: int, grid: tuple[int, int], options: dict) -> int:
        return num_frames * (cls._view_tokens(grid) + 1) + 2

    def _pool(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """`x [B, h*w, C]` -> `[B, h/2 * (w/2 + 1), D]` with a newline after each row."""
        h, w = grid
        if h % 2 or w % 2:
            raise ValueError(f"ola_pooling needs an even patch grid, got {h}x{w}")
        x = self.proj2(self.act(self.pooler(self.proj1(x.reshape(x.shape[0], h, w, -1)))))  # (B, h/2, w/2, D)
        b, hh, ww, d = x.shape
        if self.position_code is not None:
            x = self.position_code(x, sincos_2d(hh, ww, d).to(x.device))
        newline = self.image_newline.to(x.dtype).expand(b, hh, 1, d)
        return torch.cat([x, newline], dim=2).reshape(b, hh * (ww + 1), d)

    def _pool_views(self, features: list[torch.Tensor], grids: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Pools views, batching those with the same grid. Returns one `[tokens, D]` per view."""
        out: list[torch.Tensor | None] = [None] * len(features)
        for grid in dict.fromkeys(grids):
            idx = [i for i, g in enumerate(grids) if g == grid]
            pooled = self._pool(torch.stack([features[i] for i in idx]), grid)
            for i, p in zip(idx, pooled):
                out[i] = p
        return out

    def spatial_tokens(self, view_features, view_grids):
        views = self._pool_views(view_features, view_grids)
        return [v.reshape(h // 2, w // 2 + 1, -1)[:, :-1] for v, (h, w) in zip(views, view_grids)]  # no newlines

    def forward_images(self, view_features, view_grids, views_per_image):
        views = self._pool_views(view_features, view_grids)
        sep, begin, end = (v.to(views[0].dtype)[None] for v in (self.image_sep, self.image_begin, self.image_end))
        images = []
        for start in range(0, len(views), views_per_image):
            parts = [begin]
            for j, view in enumerate(views[start : start + views_per_image]):
                parts += [sep, view] if j else [view]
            images.append(torch.cat(parts + [end]))
        return images

    def forward_videos(self, videos, grids):
        out = []
        for frames, grid in zip(videos, grids):
            x = self._pool(frames, grid)  # (T, tokens, D)
            sep = self.image_sep.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([x, sep], dim=1)  # (T, tokens + 1, D)
            if self.time_code is not None:
                x = self.time_code(x, sincos_1d(torch.arange(x.shape[0]), x.shape[-1]).to(x.device)[:, None])
            x = x.flatten(0, 1)  # (T * (tokens + 1), D)
            out.append(torch.cat([self.image_begin.to(x.dtype)[None], x, self.image_end.to(x.dtype)[None]]))
        return out


class AudioConnector(nn.Module):
    """Interface of audio connectors: encoder frames of each 30 s chunk -> one `[tokens, D]` tensor per clip."""

    connector_name: str
    #: Whether a chunk's tokens follow its audio in time, evenly (one per `frames_per_token` encoder frames), so
    #: that the processor can interleave a video's sound track with its frames (`video_sound_track="interleaved"`).
    tokens_in_time_order: bool = True

    def __init__(self, audio_hidden_size: int, text_hidden_size: int, **options):
        super().__init__()

    @classmethod
    def num_audio_tokens(cls, chunk_frames: list[int], options: dict) -> int:
        """Tokens of one clip whose chunks produce `chunk_frames` encoder frames each."""
        raise NotImplementedError

    @classmethod
    def frames_per_token(cls, options: dict) -> int:
        """Encoder frames per LLM token: the processor pads variable-length chunks to a multiple of it."""
        return int(options.get("frames_per_token", 1))

    def forward(self, chunk_features: list[torch.Tensor], chunks_per_clip: list[int]) -> list[torch.Tensor]:
        raise NotImplementedError


def audio_layout_mask(connector: nn.Module, clip: torch.Tensor) -> torch.Tensor:
    """`[T]` bool: which of a clip's audio tokens `[T, D]` are the connector's layout vectors (begin / newline /
    end, found by identity)."""
    layout = [getattr(connector, n) for n in ("speech_begin", "speech_newline", "speech_end")
              if isinstance(getattr(connector, n, None), nn.Parameter)]
    if not layout:
        return torch.zeros(len(clip), dtype=torch.bool, device=clip.device)
    layout = torch.stack([v.to(clip.dtype) for v in layout])  # (S, D)
    return (clip[:, None] == layout[None]).all(-1).any(-1)


def ctc_labels(table: torch.Tensor, blank: torch.Tensor, tokens: torch.Tensor,
               ignore_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The CTC reading of each of a clip's tokens `[T, D]` against the LLM's input embeddings `table` `[V, D]` and
    the blank (`omniola.training.ctc`): the best row (cosine, as the objective scores it), `-1` where the blank
    scores higher; `ignore_ids` (special tokens, never CTC targets) are never read. Returns `[T]` LLM token ids."""
    tokens = F.normalize(tokens.float(), dim=-1)
    scores = tokens @ F.normalize(table.float(), dim=-1).T  # (T, V)
    if ignore_ids is not None:  # ids past the table (placeholders the model scatters media into) are never read
        scores[:, ignore_ids[ignore_ids < len(table)]] = -2.0
    blank_score = tokens @ F.normalize(blank.float(), dim=0)  # (T,)
    return torch.where(blank_score >= scores.max(-1).values, -1, scores.argmax(-1))


@register_audio_connector("ola_concat")
class OlaConcatConnector(AudioConnector):
    """Ola's speech projector: concatenate every k encoder frames, a 2-layer MLP, and learned begin / end / newline
    embeddings (a newline closes every 30 s chunk)."""

    def __init__(self, audio_hidden_size: int, text_hidden_size: int, frames_per_token: int = 5,
                 intermediate_size: int = 2048):
        super().__init__(audio_hidden_size, text_hidden_size)
        if frames_per_token < 1:
            raise ConfigError(f"audio_connector.frames_per_token must be >= 1, got {frames_per_token}")
        self.k = frames_per_token
        d = text_hidden_size
        self.linear1 = nn.Linear(audio_hidden_size * frames_per_token, intermediate_size)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(intermediate_size, d)
        self.speech_newline = _special_embedding(d)
        self.speech_begin = _special_embedding(d)
        self.speech_end = _special_embedding(d)

    @classmethod
    def num_audio_tokens(cls, chunk_frames: list[int], options: dict) -> int:
        k = options.get("frames_per_token", 5)
        return sum(n // k + 1 for n in chunk_frames) + 2

    def forward(self, chunk_features, chunks_per_clip):
        """`chunk_features`: one `[frames, C]` per chunk; `chunks_per_clip`: how many consecutive chunks make a clip."""
        k = self.k
        grouped = [f[: f.shape[0] // k * k].reshape(-1, k * f.shape[1]) for f in chunk_features]  # (frames/k, C*k)
        x = self.linear2(self.relu(self.linear1(torch.cat(grouped))))  # one matmul for all chunks
        chunks = x.split([g.shape[0] for g in grouped])
        newline, begin, end = (v.to(x.dtype)[None] for v in (self.speech_newline, self.speech_begin, self.speech_end))
        clips, i = [], 0
        for n in chunks_per_clip:
            body = [t for chunk in chunks[i : i + n] for t in (chunk, newline)]
            clips.append(torch.cat([begin, *body, end]))
            i += n
        return clips


# ---------------------------------------------------------------------------------------------------------------------
# Alternative connectors. Each is one configuration value (`{"type": "mlp2x_gelu"}`, `"qformer"`, `"upm"`) with the
# same token layout conventions as Ola's: an image is `[begin, ..., end]` (views joined by `sep`), a video
# `[begin, frame_1, sep, ..., frame_T, sep, end]`, an audio clip `[begin, chunk_1, newline, ..., end]`. The learned
# begin / end / newline / separator vectors are direct parameters of the connector, so `OlaPreTrainedModel` initialises
# them as it does Ola's; everything else is built from `nn.Linear` / `nn.LayerNorm`.


def _positive_int(field: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{field} must be a positive integer, got {value!r}")


class _OptionsMixin:
    """Options declared once as a dataclass (`Options`), parsed and validated for both the module and the counting
    classmethods, so a typo or a bad value is a `ConfigError` naming the config field whichever is built first
    (model, processor). Every option is a positive integer, or `None` where its default is `None`."""

    Options: type
    connector_name: str
    config_field: str  # "vision_connector" / "audio_connector"

    @classmethod
    def parse_options(cls, options: dict):
        names = [f.name for f in dataclasses.fields(cls.Options)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ConfigError(
                f"{cls.config_field}: unknown option(s) {unknown} for type {cls.connector_name!r}; it accepts {names}"
            )
        opts = cls.Options(**options)
        for f in dataclasses.fields(opts):
            value = getattr(opts, f.name)
            if value is not None or f.default is not None:
                _positive_int(f"{cls.config_field}.{f.name}", value)
        return opts


def _image_layout(
    views: list[torch.Tensor], views_per_image: int, begin: torch.Tensor, sep: torch.Tensor, end: torch.Tensor
) -> list[torch.Tensor]:
    """`views`: one `[tokens, D]` per view -> one `[begin, view_1, sep, view_2, end]` per image."""
    images = []
    for start in range(0, len(views), views_per_image):
        parts = [begin[None]]
        for j, view in enumerate(views[start : start + views_per_image]):
            parts += [sep[None], view] if j else [view]
        images.append(torch.cat(parts + [end[None]]))
    return images


def _video_layout(frames: torch.Tensor, begin: torch.Tensor, sep: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """`frames [T, tokens, D]` -> `[begin, frame_1, sep, ..., frame_T, sep, end]` as `[T * (tokens + 1) + 2, D]`."""
    sep = sep.expand(frames.shape[0], 1, -1)
    body = torch.cat([frames, sep], dim=1).flatten(0, 1)  # (T * (tokens + 1), D)
    return torch.cat([begin[None], body, end[None]])


def _clip_layout(
    chunks: list[torch.Tensor], chunks_per_clip: list[int], begin: torch.Tensor, newline: torch.Tensor,
    end: torch.Tensor,
) -> list[torch.Tensor]:
    """`chunks`: one `[tokens, D]` per 30 s chunk -> one `[begin, chunk_1, newline, chunk_2, newline, end]` per clip."""
    clips, i = [], 0
    for n in chunks_per_clip:
        body = [t for chunk in chunks[i : i + n] for t in (chunk, newline[None])]
        clips.append(torch.cat([begin[None], *body, end[None]]))
        i += n
    return clips


def _with_row_newlines(x: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
    """`x [h, w, D]` -> `[h * (w + 1), D]`: a learned newline closes every row."""
    h, w, d = x.shape
    return torch.cat([x, newline.expand(h, 1, d)], dim=1).reshape(h * (w + 1), d)


def _group_frames(x: torch.Tensor, k: int, mode: str) -> torch.Tensor:
    """`x [frames, C]` -> `[frames // k, C * k]` (concat) or `[frames // k, C]` (mean); trailing frames are dropped
    (the processor pads variable-length chunks to a multiple of k)."""
    x = x[: x.shape[0] // k * k].reshape(-1, k, x.shape[-1])  # (frames/k, k, C)
    return x.flatten(1) if mode == "concat" else x.mean(1)


class _LayoutVisionConnector(_OptionsMixin, VisionConnector):
    config_field = "vision_connector"

    def _init_layout(self, d: int, newline: bool) -> None:
        self.image_begin = _special_embedding(d)
        self.image_end = _special_embedding(d)
        self.image_sep = _special_embedding(d)
        if newline:
            self.image_newline = _special_embedding(d)

    def _specials(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.image_begin.to(dtype), self.image_sep.to(dtype), self.image_end.to(dtype)

    def _project(self, features: list[torch.Tensor], grids: list[tuple[int, int]]) -> list[torch.Tensor]:
        """One `[h*w, C]` per view or frame -> its LLM tokens (per-patch connectors implement this)."""
        raise NotImplementedError

    def forward_images(self, view_features, view_grids, views_per_image):
        views = self._project(view_features, view_grids)
        return _image_layout(views, views_per_image, *self._specials(views[0].dtype))

    def forward_videos(self, videos, grids):
        frames = self._project([f for v in videos for f in v], [g for v, g in zip(videos, grids) for _ in v])
        out, i = [], 0
        for v in videos:
            out.append(_video_layout(torch.stack(frames[i : i + len(v)]), *self._specials(frames[0].dtype)))
            i += len(v)
        return out


class _LayoutAudioConnector(_OptionsMixin, AudioConnector):
    config_field = "audio_connector"

    def _init_layout(self, d: int) -> None:
        self.speech_newline = _special_embedding(d)
        self.speech_begin = _special_embedding(d)
        self.speech_end = _special_embedding(d)

    def _layout(self, chunks: list[torch.Tensor], chunks_per_clip: list[int]) -> list[torch.Tensor]:
        dtype = chunks[0].dtype
        begin, newline, end = (v.to(dtype) for v in (self.speech_begin, self.speech_newline, self.speech_end))
        return _clip_layout(chunks, chunks_per_clip, begin, newline, end)

    @classmethod
    def frames_per_token(cls, options: dict) -> int:
        return getattr(cls.parse_options(options), "frames_per_token", 1)

    @classmethod
    def num_audio_tokens(cls, chunk_frames, options):
        """Frame-grouping connectors: one token per k frames (and the last part), a newline per chunk, begin/end."""
        k = cls.frames_per_token(options)
        return sum(n // k + 1 for n in chunk_frames) + 2


def _mlp2x_gelu(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


# --------------------------------------------------------------------------------------------------- mlp2x_gelu


@register_vision_connector("mlp2x_gelu")
class Mlp2xGeluVisionConnector(_LayoutVisionConnector):
    """LLaVA-1.5's projector: `Linear(C, D) -> GELU -> Linear(D, D)` on every patch, no pooling.

    Token layout: one token per patch with a learned `image_newline` after every row (LLaVA-NeXT's newline, needed
    here because views have native aspect ratios), so an `h x w` view gives `h * (w + 1)` tokens: four times
    `ola_pooling`'s. Images and videos use the shared begin / sep / end layout. Takes no options.
    """

    @dataclasses.dataclass
    class Options:
        pass

    def __init__(self, vision_hidden_size: int, text_hidden_size: int, **options):
        super().__init__(vision_hidden_size, text_hidden_size)
        self.parse_options(options)
        self.mlp = _mlp2x_gelu(vision_hidden_size, text_hidden_size)
        self._init_layout(text_hidden_size, newline=True)

    @classmethod
    def num_image_tokens(cls, view_grids, options):
        cls.parse_options(options)
        return sum(h * (w + 1) for h, w in view_grids) + len(view_grids) - 1 + 2

    @classmethod
    def num_video_tokens(cls, num_frames, grid, options):
        cls.parse_options(options)
        h, w = grid
        return num_frames * (h * (w + 1) + 1) + 2

    def _project(self, features: list[torch.Tensor], grids: list[tuple[int, int]]) -> list[torch.Tensor]:
        """One `[h*w, C]` per view -> one `[h * (w + 1), D]` per view; a single matmul for all patches."""
        x = self.mlp(torch.cat(features))  # (patches, D)
        newline = self.image_newline.to(x.dtype)
        return [_with_row_newlines(v.reshape(h, w, -1), newline) for v, (h, w) in
                zip(x.split([h * w for h, w in grids]), grids)]


@register_audio_connector("mlp2x_gelu")
class Mlp2xGeluAudioConnector(_LayoutAudioConnector):
    """LLaVA-1.5's projector for speech: every `frames_per_token` (k) encoder frames concatenated, then
    `Linear(C * k, D) -> GELU -> Linear(D, D)`.

    Frames are grouped as in `ola_concat` (a per-frame projector would give 50 tokens per second, too many for an
    LLM context), so token counts equal `ola_concat`'s: `frames // k + 1` per 30 s chunk (a newline closes it), plus
    begin and end per clip. Options: `frames_per_token` (default 5).
    """

    @dataclasses.dataclass
    class Options:
        frames_per_token: int = 5

    def __init__(self, audio_hidden_size: int, text_hidden_size: int, **options):
        super().__init__(audio_hidden_size, text_hidden_size)
        self.k = self.parse_options(options).frames_per_token
        self.mlp = _mlp2x_gelu(audio_hidden_size * self.k, text_hidden_size)
        self._init_layout(text_hidden_size)

    def forward(self, chunk_features, chunks_per_clip):
        grouped = [_group_frames(f, self.k, "concat") for f in chunk_features]  # (frames/k, C*k)
        x = self.mlp(torch.cat(grouped))  # one matmul for all chunks
        return self._layout(list(x.split([g.shape[0] for g in grouped])), chunks_per_clip)


# ------------------------------------------------------------------------------------------------------ qformer


class _Attention(nn.Module):
    """Multi-head attention of `x [B, n, W]` over `memory [B, m, kv_dim]`, with a key mask `[B, m]` (True: attend)."""

    def __init__(self, dim: int, kv_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(kv_dim, dim)
        self.v_proj = nn.Linear(kv_dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        h = self.num_heads
        q = self.q_proj(x).view(b, n, h, d // h).transpose(1, 2)  # (B, h, n, W/h)
        k = self.k_proj(memory).view(b, -1, h, d // h).transpose(1, 2)  # (B, h, m, W/h)
        v = self.v_proj(memory).view(b, -1, h, d // h).transpose(1, 2)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, m)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, n, W/h)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, d))


class QFormerLayer(nn.Module):
    """Pre-norm block on the queries: self-attention, cross-attention to the encoder features, MLP (4x width)."""

    def __init__(self, dim: int, kv_dim: int, num_heads: int):
        super().__init__()
        self.self_norm = nn.LayerNorm(dim)
        self.self_attn = _Attention(dim, dim, num_heads)
        self.cross_norm = nn.LayerNorm(dim)
        self.cross_attn = _Attention(dim, kv_dim, num_heads)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, q: torch.Tensor, memory: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.self_norm(q)
        q = q + self.self_attn(x, x)
        q = q + self.cross_attn(self.cross_norm(q), memory, key_mask)
        return q + self.mlp(self.mlp_norm(q))


class QFormer(nn.Module):
    """Learned queries (owned by the connector) read a set of encoder features; the output is in the LLM's space.

    `forward(queries [Q, W], memories)`: `memories` is a list of `[m_i, C]` feature sets of any lengths, padded and
    masked into one batch; returns `[len(memories), Q, D]`.
    """

    def __init__(self, in_dim: int, width: int, out_dim: int, num_layers: int, num_heads: int):
        super().__init__()
        self.memory_norm = nn.LayerNorm(in_dim)  # encoder features come without a final norm (Ola's tower)
        self.layers = nn.ModuleList(QFormerLayer(width, in_dim, num_heads) for _ in range(num_layers))
        self.out_norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, out_dim)

    def forward(self, queries: torch.Tensor, memories: list[torch.Tensor]) -> torch.Tensor:
        lengths = [m.shape[0] for m in memories]
        memory = nn.utils.rnn.pad_sequence(memories, batch_first=True)  # (N, max m, C)
        key_mask = None
        if min(lengths) != max(lengths):
            key_mask = torch.arange(memory.shape[1], device=memory.device)[None] < torch.tensor(
                lengths, device=memory.device
            )[:, None]  # (N, max m)
        memory = self.memory_norm(memory)
        q = queries.to(memory.dtype).expand(len(memories), -1, -1)  # (N, Q, W)
        for layer in self.layers:
            q = layer(q, memory, key_mask)
        return self.proj(self.out_norm(q))  # (N, Q, D)


@dataclasses.dataclass
class _QFormerOptions:
    num_queries: int = 32
    num_layers: int = 2
    num_heads: int = 4
    hidden_size: int | None = None  # the Q-Former's width; None: the encoder's width


def _build_qformer(owner: _OptionsMixin, in_dim: int, out_dim: int, options: dict) -> tuple[QFormer, int, int]:
    opts = owner.parse_options(options)
    width = opts.hidden_size or in_dim
    if width % opts.num_heads:
        raise ConfigError(
            f"{owner.config_field}.num_heads ({opts.num_heads}) must divide the Q-Former width {width} "
            f"({owner.config_field}.hidden_size, or the encoder width when unset)"
        )
    return QFormer(in_dim, width, out_dim, opts.num_layers, opts.num_heads), opts.num_queries, width


@register_vision_connector("qformer")
class QFormerVisionConnector(_LayoutVisionConnector):
    """BLIP-2's Q-Former: `num_queries` learned queries pass `num_layers` blocks of self-attention, cross-attention to
    the vision tower's patches and MLP, then LayerNorm + `Linear(W, D)`.

    Token layout, independent of resolution:
        image: `[begin, Q queries, end]`; the queries read the patches of all the image's views at once (the global and
            native views are one set of keys), so an image is `num_queries + 2` tokens with either `image_views`.
        video: `num_queries` per frame (each frame is read on its own), `[begin, frame_1, sep, ..., frame_T, sep, end]`:
            `T * (num_queries + 1) + 2`.
    Options: `num_queries` (32), `num_layers` (2), `num_heads` (4), `hidden_size` (width W; default the tower's C).
    """

    Options = _QFormerOptions

    def __init__(self, vision_hidden_size: int, text_hidden_size: int, **options):
        super().__init__(vision_hidden_size, text_hidden_size)
        self.qformer, num_queries, width = _build_qformer(self, vision_hidden_size, text_hidden_size, options)
        self.queries = nn.Parameter(torch.randn(num_queries, width) / math.sqrt(width))
        self._init_layout(text_hidden_size, newline=False)

    @classmethod
    def num_image_tokens(cls, view_grids, options):
        return cls.parse_options(options).num_queries + 2

    @classmethod
    def num_video_tokens(cls, num_frames, grid, options):
        return num_frames * (cls.parse_options(options).num_queries + 1) + 2

    def forward_images(self, view_features, view_grids, views_per_image):
        memories = [torch.cat(view_features[i : i + views_per_image])
                    for i in range(0, len(view_features), views_per_image)]  # (views * h*w, C) per image
        x = self.qformer(self.queries, memories)  # (images, Q, D)
        begin, _, end = self._specials(x.dtype)
        return [torch.cat([begin[None], image, end[None]]) for image in x]

    def forward_videos(self, videos, grids):
        x = self.qformer(self.queries, [f for v in videos for f in v])  # (all frames, Q, D)
        return [_video_layout(frames, *self._specials(x.dtype)) for frames in x.split([len(v) for v in videos])]


@register_audio_connector("qformer")
class QFormerAudioConnector(_LayoutAudioConnector):
    """BLIP-2's Q-Former on speech, per 30 s chunk (a window-level Q-Former, as SALMONN / Video-LLaMA use it).

    Token layout: `num_queries` per chunk whatever its length (a 1 s clip also gets `num_queries`), a newline closing
    each chunk, begin and end per clip: `chunks * (num_queries + 1) + 2`. Same options as the vision `qformer`
    (`hidden_size` defaults to the audio encoder's width).
    """

    tokens_in_time_order = False  # each query attends to the whole chunk

    Options = _QFormerOptions

    def __init__(self, audio_hidden_size: int, text_hidden_size: int, **options):
        super().__init__(audio_hidden_size, text_hidden_size)
        self.qformer, num_queries, width = _build_qformer(self, audio_hidden_size, text_hidden_size, options)
        self.queries = nn.Parameter(torch.randn(num_queries, width) / math.sqrt(width))
        self._init_layout(text_hidden_size)

    @classmethod
    def num_audio_tokens(cls, chunk_frames, options):
        return len(chunk_frames) * (cls.parse_options(options).num_queries + 1) + 2

    def forward(self, chunk_features, chunks_per_clip):
        x = self.qformer(self.queries, list(chunk_features))  # (chunks, Q, D)
        return self._layout(list(x), chunks_per_clip)


# ---------------------------------------------------------------------------------------------------------- upm


class SoftRoutedExperts(nn.Module):
    """OneLLM's universal projection module, reduced to its essence: K projection experts mixed per token by a soft
    router, then a projection to the LLM width.

    Each expert is a residual pre-norm MLP at the encoder width C (`x + MLP_k(LN_k(x))`); the router
    (`Linear(C, C) -> GELU -> Linear(C, K)`, softmax) weighs the experts for every token; the mixture is normed and
    projected by `Linear(C, D)`. It works on any `[..., C]` tokens, so vision and audio use the same class (each
    modality has its own instance; OneLLM shares one across modalities).
    """

    def __init__(self, in_dim: int, out_dim: int, num_experts: int, expert_hidden_size: int):
        super().__init__()
        self.router = nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, num_experts))
        self.expert_norms = nn.ModuleList(nn.LayerNorm(in_dim) for _ in range(num_experts))
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(in_dim, expert_hidden_size), nn.GELU(), nn.Linear(expert_hidden_size, in_dim))
            for _ in range(num_experts)
        )
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, out_dim)

    def router_weights(self, x: torch.Tensor) -> torch.Tensor:
        """`x [..., C]` -> `[..., K]`, summing to one."""
        return self.router(x).softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x [..., C]` -> `[..., D]`."""
        outs = torch.stack([x + e(n(x)) for n, e in zip(self.expert_norms, self.experts)], dim=-1)  # (..., C, K)
        mixed = (outs * self.router_weights(x).unsqueeze(-2)).sum(-1)  # (..., C)
        return self.proj(self.norm(mixed))


@register_vision_connector("upm")
class UpmVisionConnector(_LayoutVisionConnector):
    """OneLLM-style universal projection (`SoftRoutedExperts`) on 2x2 average-pooled patches.

    Token layout: the same as `ola_pooling` (a plain 2x2 mean instead of Ola's attention pooling, so the two are
    compared at equal token budgets): an `h x w` view gives `h/2 * (w/2 + 1)` tokens (a newline after each row);
    images and videos use the shared begin / sep / end layout. OneLLM instead reads learned modality queries; here the
    tokens stay spatial. Options: `num_experts` (3), `expert_hidden_size` (default 2 * C).
    """

    @dataclasses.dataclass
    class Options:
        num_experts: int = 3
        expert_hidden_size: int | None = None

    def __init__(self, vision_hidden_size: int, text_hidden_size: int, **options):
        super().__init__(vision_hidden_size, text_hidden_size)
        opts = self.parse_options(options)
        hidden = opts.expert_hidden_size or 2 * vision_hidden_size
        self.upm = SoftRoutedExperts(vision_hidden_size, text_hidden_size, opts.num_experts, hidden)
        self._init_layout(text_hidden_size, newline=True)

    @staticmethod
    def _view_tokens(grid: tuple[int, int]) -> int:
        h, w = grid
        return (h // 2) * (w // 2 + 1)

    @classmethod
    def num_image_tokens(cls, view_grids, options):
        cls.parse_options(options)
        return sum(cls._view_tokens(g) for g in view_grids) + len(view_grids) - 1 + 2

    @classmethod
    def num_video_tokens(cls, num_frames, grid, options):
        cls.parse_options(options)
        return num_frames * (cls._view_tokens(grid) + 1) + 2

    def _project(self, features: list[torch.Tensor], grids: list[tuple[int, int]]) -> list[torch.Tensor]:
        """One `[h*w, C]` per view -> one `[h/2 * (w/2 + 1), D]` per view; the experts run once on all tokens."""
        pooled = []
        for x, (h, w) in zip(features, grids):
            if h % 2 or w % 2:
                raise ValueError(f"upm needs an even patch grid, got {h}x{w}")
            x = x.reshape(h // 2, 2, w // 2, 2, -1).mean(dim=(1, 3))  # (h/2, w/2, C)
            pooled.append(x.flatten(0, 1))
        x = self.upm(torch.cat(pooled))  # (tokens, D)
        newline = self.image_newline.to(x.dtype)
        return [_with_row_newlines(v.reshape(h // 2, w // 2, -1), newline) for v, (h, w) in
                zip(x.split([p.shape[0] for p in pooled]), grids)]


@register_audio_connector("upm")
class UpmAudioConnector(_LayoutAudioConnector):
    """OneLLM-style universal projection (`SoftRoutedExperts`) on speech: every `frames_per_token` (k) encoder frames
    averaged (the 1-D counterpart of the vision `upm`'s 2x2 mean), then the experts.

    Token layout as `ola_concat`: `frames // k + 1` per 30 s chunk (a newline closes it), begin and end per clip.
    Options: `frames_per_token` (5), `num_experts` (3), `expert_hidden_size` (default 2 * C).
    """

    @dataclasses.dataclass
    class Options:
        frames_per_token: int = 5
        num_experts: int = 3
        expert_hidden_size: int | None = None

    def __init__(self, audio_hidden_size: int, text_hidden_size: int, **options):
        super().__init__(audio_hidden_size, text_hidden_size)
        opts = self.parse_options(options)
        self.k = opts.frames_per_token
        hidden = opts.expert_hidden_size or 2 * audio_hidden_size
        self.upm = SoftRoutedExperts(audio_hidden_size, text_hidden_size, opts.num_experts, hidden)
        self._init_layout(text_hidden_size)

    def forward(self, chunk_features, chunks_per_clip):
        grouped = [_group_frames(f, self.k, "mean") for f in chunk_features]  # (frames/k, C)
        x = self.upm(torch.cat(grouped))  # (tokens, D)
        return self._layout(list(x.split([g.shape[0] for g in grouped])), chunks_per_clip)
