#!/usr/bin/env python
"""Checks omniola against golden outputs of the ORIGINAL Ola code (a fixture directory with a `manifest.json`).

    python scripts/check_ola_fixture.py ../shared/fixtures/ola_reference_tiny [--keep DIR]

1. Converts the fixture's original checkpoint with `omniola convert ola`.
2. Runs every case through omniola with the exact inputs the reference got, and compares the logits (max |delta|,
   tolerance 1e-4 in float32), the merged input embeddings, and 8 greedy tokens with their step logits. Cases with
   speech also compare the audio encoder's float32 output (Whisper and BEATs channels) before the reference's bfloat16
   rounding; the LLM side then gets the reference's rounded features (see `bf16_encoder_states`).
3. Runs omniola's own compatibility-mode preprocessing (`OlaProcessor` with `preprocessing="ola"`) on the raw
   sources (sources/image.png, sources/speech.wav, the video frames) and the case's chat messages, and checks that it
   reproduces the stored pixel and log-mel tensors and the token ids the model was fed.
Prints one table row per case; exits 1 if any case misses (2 if the fixture cannot be read or converted).

Reading a case. The reference's `forward_kwargs` are interpreted the way `prepare_inputs_labels_for_speech_vision_text`
reads them: batch item `i` of `modalities` is an image (low-res `images[i]` + high-res `images_highres[i]`), a video
(the frames of `images_highres[i]`; its `images[i]` is replaced by a dummy), or nothing ("text": the dummy image is
encoded but never inserted). In `input_ids`, the first placeholders (-300 or -200, in order) take the visual features
and the remaining ones the speech features, whatever their ids (the reference's quirk); omniola's ids are built the
same way, with each placeholder expanded to the number of tokens its item gives. Text tokens are taken from the stored
`input_ids`; the prompt check re-tokenizes the messages with the byte-level stand-in tokenizer the manifest describes.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

LOGITS_TOL = 1e-4  # float32, as the issue asks; also the audio encoder's output before the bfloat16 rounding
PREP_TOL = 1e-6  # pixels: reproduced exactly
MEL_TOL = 1e-5  # log-mel: float32 STFT sums differ between CPUs' vector kernels; log10 near the floor amplifies it
IMAGE_ID, SPEECH_ID = -300, -200


# --------------------------------------------------------------------------------------------------------- fixture
class Fixture:
    """A fixture directory: manifest, value specs resolved to tensors (files cached)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        manifest = self.root / "manifest.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"{manifest} is missing: {root} is not an Ola fixture directory")
        self.manifest = json.loads(manifest.read_text())
        self._files: dict[str, dict[str, torch.Tensor]] = {}

    def value(self, spec: Any) -> Any:
        """Resolves a value spec: `{file, key[, view]}`, `{zeros, shape, dtype}`, `{list: [...]}` or `{value: X}`."""
        if "list" in spec:
            return [self.value(s) for s in spec["list"]]
        if "value" in spec:
            return spec["value"]
        if spec.get("zeros"):
            return torch.zeros(spec["shape"], dtype=getattr(torch, spec["dtype"]))
        if spec["file"] not in self._files:
            self._files[spec["file"]] = load_file(self.root / spec["file"])
        tensor = self._files[spec["file"]][spec["key"]]
        return tensor.view(*spec["view"]) if "view" in spec else tensor

    @property
    def cases(self) -> dict[str, dict]:
        return self.manifest["cases"]


# -------------------------------------------------------------------------------------------- reference -> omniola
@dataclass
class Visual:
    """A visual item that reaches the LLM: an image (two views) or a video (frames), as `[3, H, W]` tensors."""

    kind: str  # "image" | "video"
    views: list[torch.Tensor]  # image: [low-res, high-res]; video: frames


@dataclass
class Speech:
    mel: torch.Tensor  # [chunks, 3000, n_mels]
    wav: torch.Tensor  # [chunks, samples]


@dataclass
class CaseInputs:
    input_ids: torch.Tensor  # [1, L] with the reference's negative placeholders
    visuals: list[Visual]
    speech: list[Speech]


def _item(container: Any, i: int) -> torch.Tensor:
    return container[i]  # a list element, or a slice of a batched tensor


def reference_inputs(fixture: Fixture, case: dict) -> CaseInputs:
    """What of a case's `forward_kwargs` reaches the LLM in the reference (see the module docstring)."""
    kw = {k: fixture.value(v) for k, v in case["forward_kwargs"].items()}
    input_ids = kw["input_ids"]
    if input_ids.shape[0] != 1:
        raise ValueError("only batch size 1 fixtures are supported")
    modalities = kw.get("modalities", ["image"])
    modalities = [modalities] if isinstance(modalities, str) else list(modalities)
    visuals = []
    for i, modality in enumerate(modalities if kw.get("images_highres") is not None else []):
        high = _item(kw["images_highres"], i)
        if high.ndim == 5:
            high = high.squeeze(1)  # [F, 1, 3, H, W] -> [F, 3, H, W]
        if "video" in modality:
            visuals.append(Visual("video", list(high)))
        elif modality == "image":
            low = _item(kw["images"], i)
            if low.shape[0] != 1 or high.shape[0] != 1:
                raise ValueError("an image item must hold one low-res and one high-res view")
            visuals.append(Visual("image", [low[0], high[0]]))
        # "text": the dummy image is encoded by the reference but never inserted
    speech = []
    if "speech" in kw:
        mels, wavs, chunks = kw["speech"], kw["speech_wav"], kw.get("speech_chunks")
        if not isinstance(mels, list):  # one tensor for the batch: split by chunk counts
            counts = [int(c) for c in chunks.tolist()]
            mels, wavs = list(mels.split(counts)), list(wavs.split(counts))
        speech = [Speech(m, w) for m, w in zip(mels, wavs)]
    return CaseInputs(input_ids, visuals, speech)


def _patches(x: torch.Tensor, patch: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """`[3, H, W]` -> `([H/p * W/p, 3 * p * p], (H/p, W/p))`, row-major patches flattened channel-first."""
    c, h, w = x.shape
    gh, gw = h // patch, w // patch
    x = x.reshape(c, gh, patch, gw, patch).permute(1, 3, 0, 2, 4)
    return x.reshape(gh * gw, c * patch * patch), (gh, gw)


def omniola_inputs(model, inputs: CaseInputs) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Model inputs for omniola, and the layout (kind, embed_start, length) they give."""
    from omniola.modeling.audio import whisper_output_length
    from omniola.modeling.connectors import audio_connector_class, vision_connector_class

    ids = inputs.input_ids[0].tolist()
    slots = [i for i, t in enumerate(ids) if t in (IMAGE_ID, SPEECH_ID)]
    n_visual = sum(1 for t in ids if t == IMAGE_ID)  # the reference fills the first n_images slots with images
    visuals, speech = inputs.visuals[:n_visual], inputs.speech[: len(slots) - n_visual]
    if len(visuals) < n_visual or len(speech) < len(slots) - n_visual:
        raise ValueError(f"{len(slots)} placeholders ({n_visual} image) but {len(inputs.visuals)} visual and "
                         f"{len(inputs.speech)} speech items reach the model")

    cfg = model.config
    patch = cfg.vision_config.patch_size if cfg.vision_config is not None else 16
    vcls, vopts = vision_connector_class(cfg.vision_connector)
    data: dict[str, torch.Tensor] = {}
    image_patches, image_grids, video_patches, video_thw = [], [], [], []
    counts = []  # (kind, omniola placeholder id, tokens) per item: visual items first, then speech
    for v in visuals:
        pieces = [_patches(x, patch) for x in v.views]
        grids = [g for _, g in pieces]
        if v.kind == "image":
            image_patches += [p for p, _ in pieces]
            image_grids += grids
            counts.append(("image", cfg.image_token_id, vcls.num_image_tokens(grids, vopts)))
        else:
            video_patches += [p for p, _ in pieces]
            video_thw.append((len(pieces), *grids[0]))
            counts.append(("video", cfg.video_token_id, vcls.num_video_tokens(len(pieces), grids[0], vopts)))
    if image_patches:
        data.update(pixel_values=torch.cat(image_patches), image_grid_hw=torch.tensor(image_grids))
    if video_patches:
        data.update(pixel_values_videos=torch.cat(video_patches), video_grid_thw=torch.tensor(video_thw))

    if speech:
        acls, aopts = audio_connector_class(cfg.audio_connector)
        mel = torch.cat([s.mel for s in speech]).transpose(1, 2)  # [chunks, n_mels, 3000]
        wav = torch.cat([s.wav for s in speech])
        data.update(
            input_features=mel, feature_attention_mask=torch.ones(mel.shape[0], mel.shape[2], dtype=torch.long),
            audio_num_chunks=torch.tensor([s.mel.shape[0] for s in speech]),
        )
        if cfg.beats_config is not None:
            data.update(audio_values=wav, audio_values_mask=torch.ones_like(wav, dtype=torch.long))
        for s in speech:
            frames = [whisper_output_length(s.mel.shape[1])] * s.mel.shape[0]
            counts.append(("speech", cfg.audio_token_id, acls.num_audio_tokens(frames, aopts)))
    new_ids, layout = [], []
    for t in ids:
        if t in (IMAGE_ID, SPEECH_ID):  # the k-th placeholder takes the k-th item, whatever its id
            kind, token, n = counts[len(layout)]
            layout.append({"kind": "image_features" if kind != "speech" else "speech_features",
                           "embed_start": len(new_ids), "length": n})
            new_ids += [token] * n
        else:
            new_ids.append(t)
    input_ids = torch.tensor([new_ids])
    data.update(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    return data, layout


# ---------------------------------------------------------------------------------------- stand-in tokenizer, prompt
def stand_in_tokenizer(manifest: dict, placeholder_ids: tuple[int, int, int] | None = None):
    """The manifest's byte-level stand-in for the Qwen2 tokenizer, optionally with omniola's three placeholders.

    Rule (manifest `tokenizer.byte_rule`): byte b of non-special text -> (A * b + B) % (vocab_size - C); the special
    tokens have the manifest's ids. Unused ids below `vocab_size` are filled with `<unused_i>` tokens, so tokens added
    later (the placeholders, by `omniola convert ola`) get ids from `vocab_size` on.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from omniola.processing_ola import AUDIO_TOKEN, IMAGE_TOKEN, VIDEO_TOKEN

    spec = manifest["tokenizer"]
    match = re.search(r"\((\d+)\s*\*\s*b\s*\+\s*(\d+)\)\s*%\s*\(vocab_size\s*-\s*(\d+)\)", spec["byte_rule"])
    if match is None:
        raise ValueError(f"unknown stand-in tokenizer rule {spec['byte_rule']!r}")
    a, b, c = map(int, match.groups())
    vocab_size = spec["vocab_size"]
    chars = _bytes_to_unicode()  # what the ByteLevel pre-tokenizer turns each byte into
    vocab = {chars[byte]: (a * byte + b) % (vocab_size - c) for byte in range(256)}
    if len(set(vocab.values())) != 256:
        raise ValueError(f"the stand-in rule {spec['byte_rule']!r} maps two bytes to one id")
    specials = dict(spec["special_token_ids"])
    if placeholder_ids is not None:
        specials.update(zip((IMAGE_TOKEN, VIDEO_TOKEN, AUDIO_TOKEN), placeholder_ids))
    vocab.update(specials)
    used = set(vocab.values())
    vocab.update({f"<unused_{i}>": i for i in range(vocab_size) if i not in used})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens({"eos_token": "<|im_end|>", "additional_special_tokens": list(specials)})
    return fast


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table (what the ByteLevel pre-tokenizer emits), indexed by byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in keep:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return [chars[i] for i in range(256)]


def messages_for(case: dict, inputs: CaseInputs, sources: dict) -> list[dict] | None:
    """The chat messages a user would give for a case: its prompt's user turn as typed parts, with the raw sources.

    Media parts come from the placeholders of the user turn; the text part is what remains once the markers (and
    infer.py's glue "User's question in speech: ") are removed. Returns None when the prompt is not one user turn.
    """
    match = re.search(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", case["prompt"], flags=re.S)
    if match is None:
        return None
    content = match.group(1)
    text = re.sub(r"<image>|<speech>", "", content).replace("User's question in speech: ", "").strip()
    parts: list[dict] = []
    has_speech = bool(inputs.speech) and "<speech>" in content
    for v in inputs.visuals[: content.count("<image>")]:
        if v.kind == "image":
            parts.append({"type": "image", "image": sources["image"]})
        else:
            from omniola.media import VideoClip

            frames = sources["video_frames"][: len(v.views)]
            audio = sources["audio"] if has_speech else None
            clip = VideoClip(frames=frames, timestamps=np.arange(len(frames), dtype=np.float64), duration=0.0,
                             audio=audio)
            parts.append({"type": "video", "video": clip})
            has_speech = False  # the video's sound track is the speech
    if has_speech:
        parts.append({"type": "audio", "audio": sources["audio"]})
    if text:
        parts.append({"type": "text", "text": text})
    return [{"role": "user", "content": parts}]


# -------------------------------------------------------------------------------------------------------- results
@dataclass
class CaseResult:
    name: str
    logits_max_abs: float = float("nan")
    embeds_max_abs: float = float("nan")
    encoder_max_abs: float = float("nan")  # speech cases: float32 audio encoder output before the bf16 rounding
    greedy_agree: int = 0
    greedy_total: int = 0
    step_logits_max_abs: float = float("nan")
    layout_ok: bool = False
    prep: dict[str, float] = field(default_factory=dict)  # name -> max |delta| (inf: shape/ids mismatch)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            not self.errors
            and self.logits_max_abs <= LOGITS_TOL
            and not self.encoder_max_abs > LOGITS_TOL  # nan (no speech) passes
            and self.greedy_agree == self.greedy_total
            and self.layout_ok
            and all(v <= (MEL_TOL if k == "mel" else PREP_TOL) for k, v in self.prep.items())
        )


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def _greedy(model, data: dict[str, torch.Tensor], steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`steps` greedy tokens (no end-of-sequence stop, as the reference) and their raw logits `[steps, vocab]`."""
    config = model.generation_config
    saved = config.eos_token_id
    config.eos_token_id = None
    try:
        out = model.generate(**data, max_new_tokens=steps, do_sample=False, num_beams=1, use_cache=True,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0,
                             temperature=None, top_p=None, top_k=None)
    finally:
        config.eos_token_id = saved
    new = out.sequences[0, data["input_ids"].shape[1]:]
    return new, torch.cat(out.logits).float()


def check_case(fixture: Fixture, name: str, model, processor, sources: dict) -> CaseResult:
    case = fixture.cases[name]
    res = CaseResult(name)
    outputs = {k: fixture.value(v) for k, v in case["outputs"].items() if k in
               ("logits", "llm_inputs_embeds", "generated_ids", "generated_step_logits")}
    inputs = reference_inputs(fixture, case)
    data, layout = omniola_inputs(model, inputs)
    llm_data = data  # what the LLM side gets: for bf16-rounded speech, the reference's rounded encoder outputs
    if "speech_encoder_out_bf16" in case["outputs"] and model.config.round_audio_features_to_bf16:
        res.encoder_max_abs, states = bf16_encoder_states(fixture, case, model, data)
        llm_data = {**data, **states}

    # Layout: every reference block (image/speech features) at the same position with the same length.
    ref_blocks = [(b["kind"], b["embed_start"], b["length"]) for b in case.get("layout", []) if b["kind"] != "text"]
    res.layout_ok = ref_blocks == [(b["kind"], b["embed_start"], b["length"]) for b in layout]
    if not res.layout_ok:
        res.errors.append(f"layout {layout} != reference {ref_blocks}")

    with torch.inference_mode():
        media = {k: v for k, v in llm_data.items() if k not in ("input_ids", "attention_mask")}
        embeds = model.model.embed_multimodal(llm_data["input_ids"], **media)
        logits = model(**llm_data).logits
        res.embeds_max_abs = _max_abs(embeds, outputs["llm_inputs_embeds"])
        res.logits_max_abs = _max_abs(logits, outputs["logits"])
        if logits.shape != outputs["logits"].shape:
            res.errors.append(f"logits {list(logits.shape)} vs reference {list(outputs['logits'].shape)}")
        ref_ids = outputs["generated_ids"][0]
        ids, step_logits = _greedy(model, llm_data, len(ref_ids))
    agree = 0
    while agree < min(len(ids), len(ref_ids)) and ids[agree] == ref_ids[agree]:
        agree += 1
    res.greedy_agree, res.greedy_total = agree, len(ref_ids)
    # step logits are comparable while the tokens agree (and one step past the last agreement)
    n = min(agree + 1, len(ref_ids), len(step_logits))
    res.step_logits_max_abs = _max_abs(step_logits[:n], outputs["generated_step_logits"][:n])

    if processor is not None:
        check_preprocessing(res, case, inputs, data, processor, sources)
    return res


def bf16_encoder_states(fixture: Fixture, case: dict, model, data: dict[str, torch.Tensor]
                        ) -> tuple[float, dict[str, torch.Tensor]]:
    """Compares the audio encoder in float32; returns that max |delta| and the reference's bfloat16-rounded features
    as model inputs for the LLM side.

    The reference rounds the encoder's output to bfloat16. Float32 sums differ by a few 1e-6 between CPUs (their
    vector kernels add in different orders), and a value that close to a bfloat16 rounding midpoint rounds the other
    way: one bfloat16 step (0.4%) on a few dozen of 48000 values moves the logits by ~1e-3. So the encoder is checked
    before the rounding (against the reference's Whisper and BEATs outputs), and the LLM side gets the reference's
    rounded output as `audio_encoder_states`, which the model takes in place of its own encoder's.
    """
    outputs = case["outputs"]
    whisper = fixture.value(outputs["whisper_encoder_out"]).float()  # [chunks, T, Cw]
    reference = whisper
    if "beats_encoder_out" in outputs:
        beats = fixture.value(outputs["beats_encoder_out"]).float()  # [chunks, Tb, Cb]: padded or cut to T
        beats = torch.nn.functional.pad(beats, (0, 0, 0, max(0, whisper.shape[1] - beats.shape[1])))
        reference = torch.cat([whisper, beats[:, : whisper.shape[1]]], dim=-1)
    with torch.inference_mode():
        ours = model.model.audio_encoder(data["input_features"], data["feature_attention_mask"],
                                         data.get("audio_values"), data.get("audio_values_mask"))
    ours = torch.stack(ours)
    rounded = fixture.value(outputs["speech_encoder_out_bf16"]).float()  # [chunks, T, C]
    states = {"audio_encoder_states": rounded.flatten(0, 1),
              "audio_encoder_lengths": torch.tensor([rounded.shape[1]] * len(rounded))}
    return _max_abs(ours, reference), states


def check_preprocessing(res: CaseResult, case: dict, inputs: CaseInputs, data: dict, processor, sources: dict
                        ) -> None:
    """omniola's compatibility-mode processor on the raw sources vs the tensors and ids the model was fed."""
    try:
        messages = messages_for(case, inputs, sources)
    except KeyError as err:
        res.errors.append(f"the fixture has no source for {err} (sources/image.png, speech.wav, video_frames)")
        return
    if messages is None:
        res.errors.append("prompt is not a single user turn: preprocessing not checked")
        return
    got = processor.apply_chat_template(messages)
    if not torch.equal(got["input_ids"], data["input_ids"]):
        res.prep["ids"] = float("inf")
        res.errors.append(f"prompt ids differ: {got['input_ids'].shape[1]} tokens vs {data['input_ids'].shape[1]}")
    else:
        res.prep["ids"] = 0.0
    for key, name in (("pixel_values", "image px"), ("pixel_values_videos", "video px"),
                      ("input_features", "mel"), ("audio_values", "wav")):
        if key in data:
            res.prep[name] = _max_abs(got[key], data[key]) if key in got else float("inf")


# ----------------------------------------------------------------------------------------------------------- main
def convert_fixture(fixture: Fixture, out: Path) -> Path:
    """Converts the fixture checkpoint with the `omniola convert ola` command."""
    import typer

    from omniola.cli import app

    model = fixture.manifest.get("model", {})
    args = ["convert", "ola", str(fixture.root / model.get("checkpoint_dir", "checkpoint")), str(out), "--overwrite"]
    has_tokenizer = any((fixture.root / model.get("checkpoint_dir", "checkpoint") / f).is_file()
                        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))
    if not has_tokenizer:
        args.append("--no-tokenizer")
    heads = model.get("tiny_dims", {}).get("vit", {}).get("heads")
    if heads:
        args += ["--vision-heads", str(heads)]
    for option, key in (("--whisper", "whisper_checkpoint"), ("--beats", "beats_checkpoint")):
        if model.get(key):
            args += [option, str(fixture.root / model[key])]
    try:
        typer.main.get_command(app).main(args, standalone_mode=False)
    except SystemExit as err:  # not raised with standalone_mode=False, kept for safety
        if err.code:
            raise RuntimeError(f"omniola {' '.join(args)} failed") from err
    except typer.Exit as err:
        if err.exit_code:
            raise RuntimeError(f"omniola {' '.join(args)} failed (exit {err.exit_code})") from err
    return out


def load_sources(fixture: Fixture) -> dict:
    from omniola.media import load_audio, load_image

    root = fixture.root / "sources"
    sources: dict[str, Any] = {}
    if (root / "image.png").is_file():
        sources["image"] = load_image(root / "image.png")
    if (root / "speech.wav").is_file():
        sources["audio"] = load_audio(root / "speech.wav")
    if (root / "video_frames.safetensors").is_file():
        frames = load_file(root / "video_frames.safetensors")
        sources["video_frames"] = next(iter(frames.values())).numpy()  # [F, H, W, 3] uint8
    return sources


def build_processor(fixture: Fixture, model_dir: Path, config):
    """`OlaProcessor` of the converted model, with the manifest's stand-in tokenizer when it has none."""
    from transformers import WhisperFeatureExtractor

    from omniola.processing_ola import PROCESSOR_CONFIG_NAME, OlaProcessor, OlaProcessorSettings

    settings = OlaProcessorSettings(**json.loads((model_dir / PROCESSOR_CONFIG_NAME).read_text()))
    tokenizer = stand_in_tokenizer(fixture.manifest, (config.image_token_id, config.video_token_id,
                                                      config.audio_token_id))
    return OlaProcessor(tokenizer, WhisperFeatureExtractor.from_pretrained(model_dir), settings)


def run_checks(fixture_dir: str | Path, keep: str | Path | None = None, cases: list[str] | None = None
               ) -> list[CaseResult]:
    """Converts the fixture's checkpoint (into `keep`, or a temporary directory) and checks every case (or `cases`).

    Returns:
        One `CaseResult` per case.
    """
    from omniola import OlaForConditionalGeneration

    fixture = Fixture(Path(fixture_dir))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = convert_fixture(fixture, Path(keep) if keep else Path(tmp) / "converted")
        model = OlaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
        processor = build_processor(fixture, model_dir, model.config)
    sources = load_sources(fixture)
    results = []
    for name in cases or list(fixture.cases):
        try:
            results.append(check_case(fixture, name, model, processor, sources))
        except Exception as err:  # a case that cannot run is a miss, reported with its reason
            res = CaseResult(name)
            res.errors.append(f"{type(err).__name__}: {err}")
            results.append(res)
    return results


def format_table(results: list[CaseResult]) -> str:
    """One row per case: logits and embeddings deltas, greedy agreement, preprocessing deltas, verdict."""
    def num(x: float) -> str:
        return "-" if x != x else ("inf" if x == float("inf") else f"{x:.2e}")

    header = ["case", "max|dlogits|", "max|dembeds|", "max|denc|", "greedy", "max|dstep|", "layout", "preprocessing",
              "result"]
    rows = [header]
    for r in results:
        prep = " ".join(f"{k}={num(v)}" for k, v in r.prep.items()) or "-"
        rows.append([r.name, num(r.logits_max_abs), num(r.embeds_max_abs), num(r.encoder_max_abs),
                     f"{r.greedy_agree}/{r.greedy_total}", num(r.step_logits_max_abs), "ok" if r.layout_ok else "MISS",
                     prep, "ok" if r.ok else "MISS"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in results:
        lines += [f"{r.name}: {e}" for e in r.errors]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("fixture_dir", type=Path, help="fixture directory (with manifest.json)")
    parser.add_argument("--keep", type=Path, default=None, help="convert into this directory and keep it")
    parser.add_argument("--case", action="append", default=None, help="check only this case (repeatable)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    try:
        results = run_checks(args.fixture_dir, keep=args.keep, cases=args.case)
    except Exception as err:  # unreadable fixture or failed conversion
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    print(format_table(results))
    missed = [r.name for r in results if not r.ok]
    print(f"\n{len(results) - len(missed)}/{len(results)} cases within tolerance (logits {LOGITS_TOL:g}, "
          f"preprocessing {PREP_TOL:g}, log-mel {MEL_TOL:g})" + (f"; MISSED: {', '.join(missed)}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
