"""Connectors: from encoder features to embeddings in the LLM's space, plus the token layout around them.

Connectors are chosen by name in the config (`config.vision_connector = {"type": "ola_pooling", ...}`) through two
registries, so a new design is a new class with `@register_vision_connector("name")`, not a change to the model.
Each connector also states how many LLM tokens an item will produce (`num_image_tokens`, `num_video_tokens`,
`num_audio_tokens`): the processor expands placeholders with exactly these counts, and the model checks them.

Notation: C = encoder width, D = LLM hidden size, k = encoder frames per audio token.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
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
    return registry[name], options


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


@register_vision_connector("ola_pooling")
class OlaPoolingConnector(VisionConnector):
    """Ola's vision connector (`ola_mlp` in the original code).

    Per view: `proj1` -> 2x2 local-global attention pooling -> GELU -> `proj2`, then a learned `image_newline`
    after every row. An image is `[begin, view_1, sep, view_2, end]` (two views) or `[begin, view, end]`; a video is
    `[begin, frame_1, sep, frame_2, sep, ..., frame_T, sep, end]`.
    """

    def __init__(self, vision_hidden_size: int, text_hidden_size: int, **options):
        super().__init__(vision_hidden_size, text_hidden_size)
        if options:
            raise ConfigError(f"vision_connector 'ola_pooling' takes no options, got {sorted(options)}")
        d = text_hidden_size
        self.proj1 = nn.Linear(vision_hidden_size, d)
        self.pooler = LocalGlobalPooling(d)
        self.act = nn.GELU()
        self.proj2 = nn.Linear(d, d)
        self.image_newline = _special_embedding(d)
        self.image_begin = _special_embedding(d)
        self.image_end = _special_embedding(d)
        self.image_sep = _special_embedding(d)

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
            x = torch.cat([x, sep], dim=1).flatten(0, 1)  # (T * (tokens + 1), D)
            out.append(torch.cat([self.image_begin.to(x.dtype)[None], x, self.image_end.to(x.dtype)[None]]))
        return out


class AudioConnector(nn.Module):
    """Interface of audio connectors: encoder frames of each 30 s chunk -> one `[tokens, D]` tensor per clip."""

    connector_name: str

    def __init__(self, audio_hidden_size: int, text_hidden_size: int, **options):
        super().__init__()

    @classmethod
    def num_audio_tokens(cls, chunk_frames: list[int], options: dict) -> int:
        """Tokens of one clip whose chunks produce `chunk_frames` encoder frames each."""
        raise NotImplementedError

    def forward(self, chunk_features: list[torch.Tensor], chunks_per_clip: list[int]) -> list[torch.Tensor]:
        raise NotImplementedError


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
