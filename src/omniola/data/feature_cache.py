"""A disk cache of frozen encoders' outputs, so training stages and epochs skip the encoders.

A frozen encoder (the Whisper audio encoder with optional BEATs, and the vision tower when a stage freezes it)
gives the same output for the same input in every epoch, stage and run. :class:`EncoderFeatureCache` stores those
outputs on disk and turns a processed sample into its cached form: the raw encoder inputs of the cached
modalities are dropped and the precomputed states added, which `OlaForConditionalGeneration.forward` takes in
their place::

    cache = EncoderFeatureCache("cache/features", model, modalities=("audio", "image", "video"))
    dataset = OlaDataset(files, None, processor, transform=cache)
    cache.fill(dataset)                                    # pre-pass: compute what is missing (progress bar)
    loader = DataLoader(dataset, batch_size=8, num_workers=4, collate_fn=OlaCollator(pad_id))
    for batch in loader:
        loss = model(**batch).loss                         # image_tower_states, audio_encoder_states, ...

What a sample becomes (shapes per sample; `OlaCollator` concatenates them in sample order):

==========  ====================================================  ===============================================
modality    dropped                                               added
==========  ====================================================  ===============================================
audio       `input_features`, `feature_attention_mask`,           `audio_encoder_states [frames, C]` (all chunks),
            `audio_values`, `audio_values_mask`                   `audio_encoder_lengths [chunks]`
image       `pixel_values`                                        `image_tower_states [patches, C]` (all views)
video       `pixel_values_videos`                                 `video_tower_states [patches, C]` (all frames)
==========  ====================================================  ===============================================

`image_grid_hw`, `video_grid_thw` and `audio_num_chunks` stay. Text, labels and masks are untouched.

**Keys.** An entry is one encoder item: one audio chunk (its valid log-mel frames and their count, plus its valid
waveform samples when the model has BEATs) or one image view / video frame (its patches and patch grid). The key
is the sha256 of those tensors' bytes, dtypes and shapes, so identical media in different records, files or stages
share one entry. Image views and video frames share entries (the tower computes them the same way).

**Namespaces.** Each encoder gets a folder `ROOT/<audio|vision>-<fingerprint>`. The fingerprint hashes the
encoder's config, every tensor of its `state_dict` (names, dtypes, shapes, bytes; hashed once, at construction),
the parameter dtype, the autocast setting, the device type, torch's version and this cache's format version. A
changed encoder therefore reads and writes another folder: an old entry is never served for it. Weights changed in
place after construction (an optimizer step, `load_state_dict`) are caught by tensor version counters and raise
`ConfigError`: the cache is for frozen encoders.

**What is stored.** Exactly the tensor the encoder returns for the item computed *alone* (a batch of one, eval
mode, no grad), in the encoder's own dtype -- float32 for a float32 model, unless `autocast_dtype` is given. A
single-sample batch with cached states therefore gives bit-identical model inputs to the same sample uncached; in a
multi-sample batch the uncached path pads audio chunks to a common length and batches them, which moves the
encoder's float32 output by rounding (~1e-7 relative), so there cached and uncached agree to rounding only.

**Storage.** Entries live in immutable safetensors shards, read memory-mapped with `safe_open`. Every writer
(process, rank, DataLoader worker) writes its own shards under unique names, to a temporary file renamed into place
when complete; there is no shared mutable index. Each process builds its index from the shard headers on first
use and rescans the folder on a miss, so shards written meanwhile by others are found. Each shard's metadata holds
a sha256 per entry, checked on every read: a truncated or corrupt shard, or a corrupt entry, is logged and ignored
(the entry counts as missing and is recomputed), never served. A `fill` killed at any point keeps every shard it
renamed into place; the next `fill` computes only the rest and deletes the killed writer's temporary file.

**Misses.** `fill` computes everything a dataset needs up front. A miss in `__call__` is computed on the spot and
written (one small shard per sample) when this process holds the encoder and can run it; the cache pickles without
the model (spawned DataLoader workers), and a forked worker cannot use a CUDA encoder, so there a miss raises
:class:`FeatureCacheMiss`, which `OlaDataset` does not swallow as a bad record.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import ConfigError, InputError

__all__ = ["MODALITIES", "EncoderFeatureCache", "FeatureCacheMiss"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MODALITIES = ("audio", "image", "video")
_ENCODER_OF = {"audio": "audio", "image": "vision", "video": "vision"}
# Raw encoder inputs each modality's cached form drops, and the keys it adds.
_RAW_KEYS = {
    "audio": ("input_features", "feature_attention_mask", "audio_values", "audio_values_mask"),
    "image": ("pixel_values",),
    "video": ("pixel_values_videos",),
}
_STATE_KEY = {"audio": "audio_encoder_states", "image": "image_tower_states", "video": "video_tower_states"}
_SHARD_SUFFIX = ".safetensors"


class FeatureCacheMiss(InputError):
    """An encoder output is not in the cache and this process cannot compute it."""


@dataclass
class _Item:
    """One encoder input, as the encoder sees it alone: an audio chunk or an image view / video frame."""

    key: str
    tensors: tuple[torch.Tensor, ...]  # audio: (mel [M, n], wav [s] or absent); vision: (patches [h*w, P],)
    grid: tuple[int, int] | None = None  # vision only

    @property
    def shape(self) -> tuple:
        return tuple(tuple(t.shape) for t in self.tensors) + (self.grid,)


def _tensor_bytes(t: torch.Tensor):
    """A tensor's raw bytes as a buffer (any dtype, bfloat16 included)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _digest(tag: str, tensors: Sequence[torch.Tensor], extra: str = "") -> str:
    h = hashlib.sha256(f"{tag}|{extra}".encode())
    for t in tensors:
        h.update(f"|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


# Config fields that do not change what an encoder computes (the weights' dtype is fingerprinted on its own).
_CONFIG_NOISE = {"transformers_version", "dtype", "torch_dtype", "architectures", "name_or_path"}


def _config_dict(config) -> dict:
    d = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    return {k: v for k, v in d.items() if k not in _CONFIG_NOISE and not k.startswith("_")}


# ------------------------------------------------------------------------------------------------------ shards
def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class _ShardStore:
    """One encoder's folder of immutable safetensors shards; the index is per process and built lazily."""

    def __init__(self, directory: Path, fingerprint: str):
        self.directory = directory
        self.fingerprint = fingerprint
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._index: dict[str, list[str]] = {}  # key -> shard names holding it
        self._shards: dict[str, tuple[Any, dict[str, str]]] = {}  # name -> (safe_open handle, {key: sha256})
        self._bad: set[str] = set()  # shard names found unreadable

    def __getstate__(self):
        return {"directory": self.directory, "fingerprint": self.fingerprint}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    def _check_process(self) -> None:
        if self._pid != os.getpid():  # a forked child: its own handles
            self._reset()

    def refresh(self) -> None:
        """Adds shards written since the last scan (by any process) to the index."""
        self._check_process()
        try:
            names = sorted(p.name for p in os.scandir(self.directory)
                           if p.name.endswith(_SHARD_SUFFIX) and not p.name.startswith("."))
        except FileNotFoundError:
            return
        for name in names:
            if name not in self._shards and name not in self._bad:
                self._open_shard(name)

    def remove_stale_temporaries(self) -> int:
        """Deletes the temporary files left by writers on this host that no longer run (a writer killed between
        writing a shard and renaming it into place leaves one; its entries are simply computed again). Returns
        how many were deleted."""
        host, removed = socket.gethostname(), 0
        try:
            names = [p.name for p in os.scandir(self.directory)]
        except FileNotFoundError:
            return 0
        for name in names:
            if not (name.startswith(".") and name.endswith(_SHARD_SUFFIX + ".tmp")):
                continue
            try:  # ".<time>-<host>-<pid>-<uuid>.safetensors.tmp", as `write` names it
                head, pid, _ = name[1 : -len(_SHARD_SUFFIX + ".tmp")].rsplit("-", 2)
                if head.split("-", 1)[1] != host or _running(int(pid)):
                    continue
            except (ValueError, IndexError):
                continue
            (self.directory / name).unlink(missing_ok=True)
            removed += 1
        return removed

    def _open_shard(self, name: str) -> None:
        path = self.directory / name
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
            meta = handle.metadata() or {}
            if meta.get("fingerprint") != self.fingerprint:
                raise ValueError(f"its fingerprint {meta.get('fingerprint')!r} is not this folder's")
            checksums = json.loads(meta["sha256"])
            if set(checksums) != set(handle.keys()):
                raise ValueError("its checksum list does not match its tensors")
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as err:  # truncated, corrupt, foreign
            logger.warning("feature cache: ignoring unreadable shard %s (%s); its entries will be recomputed",
                           path, err)
            self._bad.add(name)
            return
        self._shards[name] = (handle, checksums)
        for key in checksums:
            self._index.setdefault(key, []).append(name)

    def __contains__(self, key: str) -> bool:
        self._check_process()
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def get(self, key: str) -> torch.Tensor | None:
        """The stored tensor, checked against its checksum, or `None` (missing or corrupt)."""
        self._check_process()
        names = self._index.get(key, [])
        while names:
            name = names[0]
            handle, checksums = self._shards[name]
            try:
                tensor = handle.get_tensor(key)
                ok = hashlib.sha256(_tensor_bytes(tensor)).hexdigest() == checksums[key]
            except (SafetensorError, OSError, ValueError, RuntimeError) as err:
                tensor, ok = None, False
                logger.warning("feature cache: entry %s of %s could not be read (%s)", key, name, err)
            if ok:
                return tensor
            logger.warning("feature cache: entry %s of shard %s fails its checksum; ignored, will be recomputed",
                           key, self.directory / name)
            names.pop(0)
        self._index.pop(key, None)
        return None

    def write(self, entries: Mapping[str, torch.Tensor]) -> Path | None:
        """Writes `entries` as one new shard (temporary file, then an atomic rename) and indexes it."""
        if not entries:
            return None
        self._check_process()
        self.directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in entries.items()}
        checksums = {k: hashlib.sha256(_tensor_bytes(v)).hexdigest() for k, v in tensors.items()}
        metadata = {"format": str(FORMAT_VERSION), "fingerprint": self.fingerprint, "sha256": json.dumps(checksums)}
        name = f"{time.time_ns():x}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}{_SHARD_SUFFIX}"
        tmp = self.directory / f".{name}.tmp"
        try:
            save_file(tensors, str(tmp), metadata=metadata)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.directory / name)
        finally:
            if tmp.exists():
                tmp.unlink()
        self._open_shard(name)
        return self.directory / name


# ------------------------------------------------------------------------------------------------------ encoders
class _Encoder:
    """A cached encoder: how to cut a sample into items, and how to compute a batch of same-shape items."""

    def __init__(self, name: str, module: torch.nn.Module, config: dict, autocast_dtype: torch.dtype | None):
        self.name = name
        self.module = module
        self.autocast_dtype = autocast_dtype
        self.has_beats = name == "audio" and getattr(module, "beats", None) is not None
        self.tensors = list(module.state_dict(keep_vars=True).values())
        self.versions = self._versions()
        param = next(module.parameters())
        described = {
            "format": FORMAT_VERSION, "encoder": name, "config": config, "param_dtype": str(param.dtype),
            "autocast_dtype": str(autocast_dtype), "device_type": param.device.type, "torch": torch.__version__,
        }
        h = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode())
        for key, t in module.state_dict().items():
            h.update(f"|{key}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(_tensor_bytes(t))
        self.fingerprint = h.hexdigest()
        self.described = described
        self.batching_ok: bool | None = None  # None: not yet checked
        self.verified_shapes: set[tuple] = set()

    def _versions(self) -> list[int]:
        return [t._version for t in self.tensors]

    def check_unchanged(self) -> None:
        if self._versions() != self.versions:
            raise ConfigError(
                f"the {self.name} encoder's weights changed after its EncoderFeatureCache was created; the cache "
                "serves frozen encoders only (create a new cache for the new weights)"
            )

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def compute(self, items: Sequence[_Item]) -> list[torch.Tensor]:
        """The encoder on `items` (all of one shape) as one batch, in eval mode without grad."""
        self.check_unchanged()
        device = self.device
        modes = [(m, m.training) for m in self.module.modules()]
        if self.autocast_dtype is None:
            autocast = torch.autocast(device.type, enabled=False)
        else:
            autocast = torch.autocast(device.type, dtype=self.autocast_dtype)
        self.module.eval()
        try:
            with torch.no_grad(), autocast:
                if self.name == "audio":
                    mel = torch.stack([it.tensors[0] for it in items]).to(device)  # (B, M, n)
                    mask = torch.ones(mel.shape[0], mel.shape[-1], dtype=torch.long, device=device)  # (B, n)
                    wav = wav_mask = None
                    if self.has_beats:
                        wav = torch.stack([it.tensors[1] for it in items]).to(device)  # (B, s)
                        wav_mask = torch.ones(wav.shape, dtype=torch.long, device=device)
                    out = self.module(mel, mask, wav, wav_mask)
                else:
                    patches = torch.cat([it.tensors[0] for it in items]).to(device)  # (B*h*w, P)
                    grid = torch.tensor([it.grid for it in items], dtype=torch.long)  # (B, 2)
                    out = self.module(patches, grid)
        finally:
            for m, training in modes:
                m.training = training
        return [o.detach().cpu() for o in out]

    def compute_alone(self, items: Sequence[_Item]) -> list[torch.Tensor]:
        return [self.compute([it])[0] for it in items]

    def compute_batched(self, items: Sequence[_Item]) -> list[torch.Tensor]:
        """As `compute_alone`, batched when batching is known to give the same bits.

        The first batch of every distinct batch shape is also computed item by item and compared; one difference
        and this encoder computes item by item from then on (e.g. Whisper on CPU, where the batched matmuls round
        differently).
        """
        if len(items) == 1 or self.batching_ok is False:
            return self.compute_alone(items)
        out = self.compute(items)
        signature = (len(items),) + items[0].shape
        if signature not in self.verified_shapes:
            alone = self.compute_alone(items)
            if not all(torch.equal(a, b) for a, b in zip(out, alone)):
                logger.info("feature cache: batching changes the %s encoder's output bits; computing items one "
                            "by one", self.name)
                self.batching_ok = False
                return alone
            self.verified_shapes.add(signature)
            self.batching_ok = True
        return out


def _audio_items(sample: Mapping[str, torch.Tensor], has_beats: bool) -> list[_Item]:
    features = sample["input_features"]  # (chunks, M, T)
    if features.ndim != 3:
        raise InputError(f"input_features must be [chunks, mels, frames], got shape {tuple(features.shape)}")
    mask = sample.get("feature_attention_mask")  # (chunks, T)
    values, values_mask = sample.get("audio_values"), sample.get("audio_values_mask")
    if has_beats and values is None:
        raise InputError("the model has a BEATs encoder: the sample needs audio_values (raw waveforms) too")
    items = []
    for i in range(features.shape[0]):
        n = features.shape[-1] if mask is None else _prefix_length(mask[i], "feature_attention_mask")
        tensors = (features[i, :, :n].contiguous(),)
        if has_beats:
            s = values.shape[-1] if values_mask is None else _prefix_length(values_mask[i], "audio_values_mask")
            tensors += (values[i, :s].contiguous(),)
        items.append(_Item(_digest("audio", tensors), tensors))
    return items


def _prefix_length(mask: torch.Tensor, field: str) -> int:
    n = int(mask.sum())
    if not bool(mask[:n].all()):
        raise InputError(f"{field}: each row must be ones then zeros (a valid prefix), got a gap")
    return n


def _view_items(patches: torch.Tensor, grids: Sequence[tuple[int, int]], field: str) -> list[_Item]:
    sizes = [h * w for h, w in grids]
    if sum(sizes) != patches.shape[0]:
        raise InputError(f"{field}: the grids describe {sum(sizes)} patches but it has {patches.shape[0]} rows")
    items = []
    for view, (h, w) in zip(patches.split(sizes), grids):
        view = view.contiguous()
        items.append(_Item(_digest("view", (view,), f"{h}x{w}"), (view,), (h, w)))
    return items


def _items(sample: Mapping[str, torch.Tensor], modality: str, has_beats: bool) -> list[_Item]:
    if modality == "audio":
        return _audio_items(sample, has_beats)
    if modality == "image":
        return _view_items(sample["pixel_values"], [tuple(g) for g in sample["image_grid_hw"].tolist()],
                           "pixel_values")
    grids = [(h, w) for t, h, w in sample["video_grid_thw"].tolist() for _ in range(t)]
    return _view_items(sample["pixel_values_videos"], grids, "pixel_values_videos")


def _present(sample: Mapping[str, Any], modality: str) -> bool:
    return _RAW_KEYS[modality][0] in sample


# ------------------------------------------------------------------------------------------------------ the cache
class EncoderFeatureCache:
    """Frozen encoders' outputs on disk, keyed by input content and encoder fingerprint (see the module docstring).

    Use it as `OlaDataset(..., transform=cache)` (it is callable on a sample), fill it with :meth:`fill`.

    Args:
        root: Folder of the cache; one sub-folder per encoder fingerprint. Shared by stages and runs.
        model: `OlaForConditionalGeneration` (or `OlaModel`) whose encoders are cached. Its encoder weights are
            hashed once, here; they must not change afterwards.
        modalities: Which of `"audio"`, `"image"`, `"video"` to cache (image and video share the vision tower).
        autocast_dtype: Compute the encoders under `torch.autocast` with this dtype (`None`: their own dtype,
            autocast disabled). Part of the fingerprint.
        shard_mb: `fill` writes a shard whenever this many MiB of new entries have accumulated.

    Raises:
        ConfigError: an unknown modality, the model has no encoder for one, or `shard_mb` is not positive.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        model: torch.nn.Module,
        modalities: Sequence[str] = ("audio",),
        *,
        autocast_dtype: torch.dtype | None = None,
        shard_mb: float = 256.0,
    ):
        modalities = tuple(dict.fromkeys(modalities))
        unknown = [m for m in modalities if m not in MODALITIES]
        if unknown or not modalities:
            raise ConfigError(f"modalities must be a non-empty subset of {MODALITIES}, got {list(modalities)}")
        if shard_mb <= 0:
            raise ConfigError(f"shard_mb must be positive, got {shard_mb}")
        inner = getattr(model, "model", model)
        self.root = Path(root)
        self.modalities = modalities
        self.shard_bytes = int(shard_mb * 2**20)
        self._encoders: dict[str, _Encoder] = {}
        self._stores: dict[str, _ShardStore] = {}
        for modality in modalities:
            name = _ENCODER_OF[modality]
            if name in self._encoders:
                continue
            module = getattr(inner, "audio_encoder" if name == "audio" else "vision_tower", None)
            if module is None:
                raise ConfigError(f"modalities includes {modality!r} but the model has no {name} encoder")
            if name == "audio":
                config = {"whisper": _config_dict(module.whisper.config),
                          "beats": None if module.beats is None else _config_dict(module.beats.config)}
            else:
                config = _config_dict(module.config)
            encoder = _Encoder(name, module, config, autocast_dtype)
            self._encoders[name] = encoder
            directory = self.root / f"{name}-{encoder.fingerprint[:24]}"
            self._stores[name] = _ShardStore(directory, encoder.fingerprint)
            _write_description(directory, encoder.described | {"fingerprint": encoder.fingerprint})
        self.stats = {"hits": 0, "misses": 0, "computed": 0}

    # ----------------------------------------------------------------------------------------------- pickling
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_encoders"] = {name: None for name in self._encoders}  # no model in pickles (spawned workers)
        return state

    def directory(self, modality: str) -> Path:
        """The folder holding `modality`'s entries for this encoder fingerprint."""
        return self._stores[_ENCODER_OF[modality]].directory

    def num_entries(self) -> int:
        """Entries on disk for these encoders (a scan; duplicates written by concurrent writers count once)."""
        for store in self._stores.values():
            store.refresh()
        return sum(len(s) for s in self._stores.values())

    # ----------------------------------------------------------------------------------------------- transform
    def __call__(self, sample: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
        """A processed sample (as `OlaDataset` returns it) in cached form (see the module docstring).

        Raises:
            FeatureCacheMiss: an entry is missing and this process cannot compute it (run `fill` first).
            ConfigError: the encoder's weights changed since the cache was created.
        """
        if sample is None:
            return None
        out = dict(sample)
        for modality in self.modalities:
            if not _present(sample, modality):
                continue
            name = _ENCODER_OF[modality]
            encoder = self._encoders[name]
            if encoder is not None:
                encoder.check_unchanged()
            items = _items(sample, modality, self._has_beats(name, sample))
            states = self._lookup(name, items)
            for key in _RAW_KEYS[modality]:
                out.pop(key, None)
            out[_STATE_KEY[modality]] = torch.cat(states)
            if modality == "audio":
                out["audio_encoder_lengths"] = torch.tensor([s.shape[0] for s in states], dtype=torch.long)
        return out

    def _has_beats(self, name: str, sample: Mapping[str, Any]) -> bool:
        encoder = self._encoders[name]
        if encoder is not None:
            return encoder.has_beats
        return name == "audio" and "audio_values" in sample  # no model here: the fingerprint covers the rest

    def _lookup(self, name: str, items: Sequence[_Item]) -> list[torch.Tensor]:
        store = self._stores[name]
        if not len(store):
            store.refresh()
        found = {it.key: store.get(it.key) for it in items}
        missing = [it for it in items if found[it.key] is None]
        if missing:
            store.refresh()  # another process may have written them
            for it in missing:
                found[it.key] = store.get(it.key)
            missing = list({it.key: it for it in items if found[it.key] is None}.values())
        self.stats["hits"] += len(items) - len(missing)
        if missing:
            self.stats["misses"] += len(missing)
            encoder = self._computable(name, len(missing))
            computed = dict(zip([it.key for it in missing], encoder.compute_alone(missing)))
            self.stats["computed"] += len(computed)
            store.write(computed)
            found.update(computed)
        return [found[it.key] for it in items]

    def _computable(self, name: str, n_missing: int) -> _Encoder:
        encoder = self._encoders[name]
        where = self._stores[name].directory
        if encoder is None:
            raise FeatureCacheMiss(
                f"{n_missing} {name} encoder output(s) are not in the feature cache {where} and this process has "
                "no encoder (the cache was pickled, e.g. into a spawned DataLoader worker); run cache.fill(dataset) "
                "before training"
            )
        if torch.utils.data.get_worker_info() is not None and encoder.device.type != "cpu":
            raise FeatureCacheMiss(
                f"{n_missing} {name} encoder output(s) are not in the feature cache {where}, and a DataLoader "
                f"worker cannot run the {encoder.device.type} encoder; run cache.fill(dataset) before training"
            )
        return encoder

    # ----------------------------------------------------------------------------------------------- fill
    def fill(
        self,
        data: Iterable[Mapping[str, torch.Tensor] | None],
        *,
        batch_size: int = 16,
        num_workers: int = 0,
        progress: bool = True,
    ) -> dict[str, int]:
        """Computes and stores every missing entry of `data` (a pre-pass; run it once before training).

        Items of the same shape are batched `batch_size` at a time when batching gives the same bits as computing
        each item alone (checked on the first batch of every shape); otherwise items are computed one by one.
        Computation is in the encoder's own dtype (float32 for a float32 model) unless `autocast_dtype` was
        given, in eval mode without grad.

        Args:
            data: An `OlaDataset` or a `Subset` of one (their `transform` is bypassed), or any dataset / iterable of
                processed samples (raw: with `input_features`, `pixel_values`, ...).
            batch_size: Items per encoder call.
            num_workers: DataLoader workers decoding samples (for a map-style dataset).
            progress: Show a tqdm progress bar.

        Returns:
            Counts: `samples`, `items` (encoder items seen), `cached` (already present), `computed`, `shards`.
        """
        from tqdm.auto import tqdm

        if batch_size < 1:
            raise InputError(f"batch_size must be positive, got {batch_size}")
        for name, encoder in self._encoders.items():
            if encoder is None:
                raise FeatureCacheMiss(f"this cache has no {name} encoder in this process (it was pickled); "
                                       "call fill where the model was given")
        data = _without_transform(data)
        samples: Iterable = data
        if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
            samples = torch.utils.data.DataLoader(data, batch_size=None, num_workers=num_workers)
        total = len(data) if hasattr(data, "__len__") else None

        counts = {"samples": 0, "items": 0, "cached": 0, "computed": 0, "shards": 0}
        for store in self._stores.values():
            if removed := store.remove_stale_temporaries():
                logger.info("feature cache: deleted %d temporary files of killed writers in %s", removed,
                            store.directory)
            store.refresh()
        queued: dict[str, dict[tuple, list[_Item]]] = {name: {} for name in self._encoders}
        seen: set[str] = set()
        done: dict[str, dict[str, torch.Tensor]] = {name: {} for name in self._encoders}
        done_bytes = dict.fromkeys(self._encoders, 0)

        def run(name: str, items: list[_Item]) -> None:
            for it, state in zip(items, self._encoders[name].compute_batched(items)):
                done[name][it.key] = state
                done_bytes[name] += state.numel() * state.element_size()
            counts["computed"] += len(items)
            if done_bytes[name] >= self.shard_bytes:
                flush(name)

        def flush(name: str) -> None:
            if done[name]:
                self._stores[name].write(done[name])
                counts["shards"] += 1
            done[name], done_bytes[name] = {}, 0

        for sample in tqdm(samples, total=total, desc="feature cache", unit="sample", disable=not progress):
            if sample is None:
                continue
            counts["samples"] += 1
            for modality in self.modalities:
                if not _present(sample, modality):
                    continue
                name = _ENCODER_OF[modality]
                for it in _items(sample, modality, self._encoders[name].has_beats):
                    counts["items"] += 1
                    if it.key in seen or it.key in self._stores[name]:
                        counts["cached"] += 1
                        continue
                    seen.add(it.key)
                    group = queued[name].setdefault(it.shape, [])
                    group.append(it)
                    if len(group) == batch_size:
                        run(name, queued[name].pop(it.shape))
        for name, groups in queued.items():
            for items in groups.values():
                run(name, items)
            flush(name)
        self.stats["computed"] += counts["computed"]
        return counts


def _without_transform(data):
    """`data` with the `OlaDataset` transform (this cache, typically) bypassed: fill needs the raw samples."""
    from .ola_format import OlaDataset

    if isinstance(data, torch.utils.data.Subset):
        inner = _without_transform(data.dataset)
        return data if inner is data.dataset else torch.utils.data.Subset(inner, data.indices)
    if isinstance(data, OlaDataset) and data.transform is not None:
        data = copy.copy(data)  # the same records and skip log
        data.transform = None
    return data


def _write_description(directory: Path, described: dict) -> None:
    """`encoder.json`: what the folder's fingerprint covers (for people; never read back)."""
    path = directory / "encoder.json"
    if path.exists():
        return
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".encoder.json.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_text(json.dumps(described, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)
