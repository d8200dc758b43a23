"""`omniola convert ola` and Ola compatibility mode, proven on golden outputs of the original Ola code.

The fixture (`../shared/fixtures/ola_reference_tiny`) holds a tiny checkpoint saved by the original code, the exact
inputs of seven cases and what the original produced; `scripts/check_ola_fixture.py` converts and compares. The
tests skip when the fixture directory is absent.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from omniola import OlaForConditionalGeneration, OlaProcessor, ola_compat
from omniola.cli import app
from omniola.convert.ola import convert_ola_checkpoint, read_ola_source
from omniola.errors import ConversionError
from omniola.processing_ola import AUDIO_TOKEN, IMAGE_TOKEN, VIDEO_TOKEN

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "ola_reference_tiny"
CHECKPOINT = FIXTURE / "checkpoint"
WHISPER_PREFIX, BEATS_PREFIX = "model.speech_encoder.whisper_model.", "model.speech_encoder.beats_model."

needs_fixture = pytest.mark.skipif(not (FIXTURE / "manifest.json").is_file(), reason=f"{FIXTURE} is absent")
runner = CliRunner()


def _check_script():
    """scripts/check_ola_fixture.py as a module (scripts/ is not a package)."""
    if "check_ola_fixture" not in sys.modules:
        spec = importlib.util.spec_from_file_location("check_ola_fixture", ROOT / "scripts" / "check_ola_fixture.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["check_ola_fixture"] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules["check_ola_fixture"]


def _convert(src: Path, out: Path, *extra: str):
    return runner.invoke(app, ["convert", "ola", str(src), str(out), "--no-tokenizer", "--vision-heads", "2", *extra])


def _copy_checkpoint(tmp_path: Path, *, edit=None, config=None, shards: int = 1) -> Path:
    """A copy of the fixture checkpoint: `edit(tensors)` changes the tensors, `config(dict)` the config.json, and
    `shards > 1` splits the weights into that many shards with an index."""
    dst = tmp_path / "src"
    shutil.copytree(CHECKPOINT, dst)
    for file in dst.iterdir():
        file.chmod(0o644)
    tensors = load_file(dst / "model.safetensors")
    if edit is not None:
        edit(tensors)
    (dst / "model.safetensors").unlink()
    keys = sorted(tensors)
    parts = [keys[i::shards] for i in range(shards)]
    if shards == 1:
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, part in enumerate(parts):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: tensors[k] for k in part}, dst / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in part})
        (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _no_output(out: Path) -> bool:
    return not out.exists() and not out.with_name(out.name + ".partial").exists()


# ---------------------------------------------------------------------------------------------------- golden cases
@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(check results for every case, converted model directory)."""
    if not (FIXTURE / "manifest.json").is_file():
        pytest.skip(f"{FIXTURE} is absent")
    out = tmp_path_factory.mktemp("ola") / "converted"
    results = _check_script().run_checks(FIXTURE, keep=out)
    return {r.name: r for r in results}, out


CASES = ["text", "image", "video", "video_inferpy", "audio", "image_speech", "video_audio"]


@needs_fixture
@pytest.mark.parametrize("case", CASES)
def test_case_matches_the_original(converted, case):
    """Logits within 1e-4, the same 8 greedy tokens, the reference's block layout, the audio encoder within 1e-4
    before the bf16 rounding, and compat preprocessing of the raw sources reproducing the stored pixels, waveforms and
    token ids exactly and the log-mel within 1e-5."""
    results, _ = converted
    r = results[case]
    assert r.ok, _check_script().format_table([r])
    assert r.logits_max_abs <= 1e-4 and r.greedy_agree == r.greedy_total == 8
    if "speech" in case or "audio" in case:
        assert r.encoder_max_abs <= 1e-4
    assert r.prep["ids"] == 0.0 and r.prep.get("mel", 0.0) <= 1e-5
    assert all(v <= 1e-6 for k, v in r.prep.items() if k != "mel")


@needs_fixture
def test_every_fixture_case_is_checked(converted):
    manifest = json.loads((FIXTURE / "manifest.json").read_text())
    assert set(converted[0]) == set(manifest["cases"])


@needs_fixture
def test_check_script_exit_code_and_table(capsys):
    assert _check_script().main([str(FIXTURE), "--case", "audio"]) == 0
    out = capsys.readouterr().out
    assert "max|dlogits|" in out and "audio" in out and "1/1 cases within tolerance" in out


@needs_fixture
def test_converted_checkpoint_loads_completely(converted):
    _, out = converted
    model, info = OlaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    cfg = model.config
    assert (cfg.image_views, cfg.audio_padding, cfg.round_audio_features_to_bf16) == ("global+native", "fixed", True)
    assert cfg.beats_config.reference_attention
    assert (cfg.image_token_id, cfg.video_token_id, cfg.audio_token_id) == (512, 513, 514)  # past the vocabulary
    settings = json.loads((out / "processor_config.json").read_text())
    assert settings["preprocessing"] == "ola" and settings["global_view_pixels"] == 384 * 384
    assert (out / "NO_TOKENIZER.txt").is_file() and not (out / "tokenizer_config.json").exists()
    assert oct((out / "model.safetensors").stat().st_mode & 0o777) == oct(0o644)


# ------------------------------------------------------------------------------------------------------- bad input
@needs_fixture
def test_not_an_ola_directory(tmp_path):
    result = _convert(tmp_path, tmp_path / "out")
    assert result.exit_code == 2 and "config.json is missing" in result.output
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    result = _convert(tmp_path, tmp_path / "out")
    assert result.exit_code == 2 and "'qwen2', expected 'ola_qwen'" in result.output
    assert _no_output(tmp_path / "out")


@needs_fixture
def test_missing_shard(tmp_path):
    src = _copy_checkpoint(tmp_path, shards=2)
    (src / "model-00002-of-00002.safetensors").unlink()
    result = _convert(src, tmp_path / "out")
    assert result.exit_code == 2 and "model-00002-of-00002.safetensors is missing" in result.output
    assert _no_output(tmp_path / "out")


@needs_fixture
def test_unknown_key(tmp_path):
    src = _copy_checkpoint(tmp_path, edit=lambda t: t.update({"model.vision_resampler.weight": torch.zeros(2)}))
    result = _convert(src, tmp_path / "out")
    assert result.exit_code == 2
    assert "does not know: 'model.vision_resampler.weight' in model.safetensors" in result.output
    assert _no_output(tmp_path / "out")


@needs_fixture
def test_shape_mismatch(tmp_path):
    def edit(tensors):
        tensors["model.mm_projector.proj2.weight"] = torch.zeros(64, 32)

    result = _convert(_copy_checkpoint(tmp_path, edit=edit), tmp_path / "out")
    assert result.exit_code == 2
    assert "'model.mm_projector.proj2.weight' has shape [64, 32]" in result.output
    assert "omniola expects [64, 64]" in result.output
    assert _no_output(tmp_path / "out")


@needs_fixture
def test_missing_tensor_is_named_by_its_original_name(tmp_path):
    src = _copy_checkpoint(tmp_path, edit=lambda t: t.pop("model.vision_tower.vision_tower.blocks.1.attn.qkv.bias"))
    result = _convert(src, tmp_path / "out")
    assert result.exit_code == 2 and "missing from the checkpoint" in result.output
    assert "model.vision_tower.vision_tower.blocks.1.attn.qkv.bias" in result.output
    assert _no_output(tmp_path / "out")


def _without_speech_encoders(tensors):
    for key in [k for k in tensors if k.startswith((WHISPER_PREFIX, BEATS_PREFIX))]:
        del tensors[key]


@needs_fixture
@pytest.mark.parametrize("which, option, message", [
    ("whisper-tiny-random.pt", "--whisper", "Whisper encoder is not in the shards"),
    ("BEATs-tiny-random.pt", "--beats", "BEATs encoder is not in the shards"),
])
def test_missing_encoder_file(tmp_path, which, option, message):
    src = _copy_checkpoint(tmp_path, edit=_without_speech_encoders)
    (src / which).unlink()
    result = _convert(src, tmp_path / "out")
    assert result.exit_code == 2 and message in result.output and which in result.output
    result = _convert(src, tmp_path / "out", option, str(tmp_path / "nowhere.pt"))
    assert result.exit_code == 2 and "nowhere.pt does not exist" in result.output
    assert _no_output(tmp_path / "out")


@needs_fixture
def test_existing_output_is_kept_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    result = _convert(CHECKPOINT, out)
    assert result.exit_code == 2 and "already exists" in result.output and (out / "keep.txt").is_file()


@needs_fixture
def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    import omniola.convert.ola as ola

    def broken(*args, **kwargs):
        raise ConversionError("disk full")

    monkeypatch.setattr(ola, "_generation_config", broken)
    with pytest.raises(ConversionError, match="disk full"):
        convert_ola_checkpoint(CHECKPOINT, tmp_path / "out", no_tokenizer=True, vision_heads=2, log=lambda _: None)
    assert _no_output(tmp_path / "out")


@needs_fixture
def test_failed_overwrite_keeps_the_old_output(tmp_path, monkeypatch):
    import omniola.convert.ola as ola

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")

    def broken(*args, **kwargs):
        raise ConversionError("disk full")

    monkeypatch.setattr(ola, "_generation_config", broken)
    with pytest.raises(ConversionError, match="disk full"):
        convert_ola_checkpoint(CHECKPOINT, out, no_tokenizer=True, vision_heads=2, overwrite=True, log=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "keep.txt").read_text() == "x"


KILLED_CONVERT = """
import os, signal, sys
from pathlib import Path

rename = os.rename


def killing(a, b):  # SIGKILL at the swap's second rename: the old output moved aside, the new one not yet in place
    if Path(a).name.endswith(".partial"):
        os.kill(os.getpid(), signal.SIGKILL)
    rename(a, b)


os.rename = killing
from omniola.convert.ola import convert_ola_checkpoint

convert_ola_checkpoint(sys.argv[1], sys.argv[2], no_tokenizer=True, vision_heads=2, overwrite=True, log=print)
"""


@needs_fixture
def test_overwrite_killed_during_its_swap_loses_neither_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("the previous output")
    killed = subprocess.run([sys.executable, "-c", KILLED_CONVERT, str(CHECKPOINT), str(out)], capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not out.exists() and (tmp_path / "out.previous" / "keep.txt").is_file()  # the kill came mid-swap
    assert (tmp_path / "out.partial" / "config.json").is_file()
    # the next run puts the previous output back (and, without --overwrite, keeps it) ...
    result = _convert(CHECKPOINT, out)
    assert result.exit_code == 2 and "already exists" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "keep.txt").read_text() == "the previous output"
    # ... and with --overwrite replaces it completely
    assert _convert(CHECKPOINT, out, "--overwrite").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert not (out / "keep.txt").exists()
    OlaForConditionalGeneration.from_pretrained(out)


# ---------------------------------------------------------------------------------------------- other source forms
@needs_fixture
def test_encoders_from_their_files_and_sharded_bf16_output(tmp_path, converted):
    """Shards without the speech encoders: Whisper and BEATs come from the .pt files (as the original loads them),
    equal to what the shards held; output cast to bfloat16 in several shards with an index."""
    src = _copy_checkpoint(tmp_path, edit=_without_speech_encoders, shards=3)
    out = tmp_path / "out"
    result = _convert(src, out, "--dtype", "bfloat16", "--max-shard-gb", str(1 / 1024))
    assert result.exit_code == 0, result.output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reference = OlaForConditionalGeneration.from_pretrained(converted[1]).state_dict()
    model, info = OlaForConditionalGeneration.from_pretrained(out, dtype=torch.bfloat16, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for key, value in model.state_dict().items():
        assert value.dtype == torch.bfloat16
        torch.testing.assert_close(value, reference[key].to(torch.bfloat16), rtol=0, atol=0)


@needs_fixture
def test_beats_config_inferred_from_shapes_matches_the_file():
    """Without the BEATs file, its config comes from the shard shapes plus the released checkpoints' settings."""
    from omniola.convert.ola import _beats_config_from_shapes

    cfg = torch.load(CHECKPOINT / "BEATs-tiny-random.pt", weights_only=True)["cfg"]
    inferred = _beats_config_from_shapes(read_ola_source(CHECKPOINT)).to_dict()
    assert {k: inferred[k] for k in cfg} == cfg


@needs_fixture
def test_convert_with_tokenizer_then_chat(tmp_path):
    """A checkpoint with tokenizer files converts into a directory `omniola chat` runs: placeholders added past the
    vocabulary, the qwen_1_5 template, `<|im_end|>` an end-of-sequence id."""
    check = _check_script()
    manifest = json.loads((FIXTURE / "manifest.json").read_text())
    src = _copy_checkpoint(tmp_path)
    check.stand_in_tokenizer(manifest).save_pretrained(src)
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert", "ola", str(src), str(out), "--vision-heads", "2"])
    assert result.exit_code == 0, result.output
    processor = OlaProcessor.from_pretrained(out)
    assert (processor.image_token_id, processor.video_token_id, processor.audio_token_id) == (512, 513, 514)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 511

    result = runner.invoke(app, ["chat", "--model", str(out), "--image", str(FIXTURE / "sources" / "image.png"),
                                 "--json", "--max-new-tokens", "3", "Describe this image in one sentence."])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["tokens"]["image"] == 167 and answer["timings"]["num_tokens"] == 3  # the reference's image block


@needs_fixture
def test_vocabulary_rows_past_the_tokenizer_are_dropped(tmp_path, converted):
    """As Ola's loader (`resize_token_embeddings(len(tokenizer))`): Qwen2.5 pads its 151665 tokens to 152064 rows."""
    def pad(tensors):
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            tensors[key] = torch.cat([tensors[key], torch.randn(8, tensors[key].shape[1])])

    src = _copy_checkpoint(tmp_path, edit=pad, config=lambda cfg: cfg.update(vocab_size=520))
    manifest = json.loads((FIXTURE / "manifest.json").read_text())
    _check_script().stand_in_tokenizer(manifest).save_pretrained(src)  # 512 tokens
    result = runner.invoke(app, ["convert", "ola", str(src), str(tmp_path / "out"), "--vision-heads", "2"])
    assert result.exit_code == 0, result.output
    assert "keeping the first 512 of 520 vocabulary rows" in result.output
    model = OlaForConditionalGeneration.from_pretrained(tmp_path / "out")
    reference = OlaForConditionalGeneration.from_pretrained(converted[1])
    assert model.config.text_config.vocab_size == 512 and model.config.image_token_id == 512
    torch.testing.assert_close(model.lm_head.weight, reference.lm_head.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.get_input_embeddings().weight, reference.get_input_embeddings().weight,
                               rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ compat functions
def test_image_views_pad_small_and_shrink_large_images():
    bounds = dict(max_pixels=1536**2, min_pixels=0, lowres_pixels=384**2)
    # 150x100 is padded to 160x128 (grey, centred); the low-res view is computed from the padded image.
    assert ola_compat.image_view_sizes(150, 100, **bounds) == [(416, 320), (160, 128)]
    image = Image.new("RGB", (150, 100), (255, 0, 0))
    low, high = ola_compat.image_views(image, **bounds)
    assert (low.size, high.size) == ((416, 320), (160, 128))
    assert high.getpixel((0, 0)) == (127, 127, 127) and high.getpixel((80, 64)) == (255, 0, 0)
    # Larger than 1536^2 pixels: scaled down, sides rounded down to multiples of 32.
    assert ola_compat.image_view_sizes(3000, 2000, **bounds)[1] == (1856, 1248)


def test_video_frames_pad_inside_bounds_and_resize_outside():
    bounds = dict(min_pixels=288**2, max_pixels=480**2)
    assert ola_compat.video_frame_size(160, 96, **bounds) == (320, 192)  # too small: scaled up
    assert ola_compat.video_frame_size(400, 300, **bounds) == (448, 320)  # inside: padded to multiples of 64
    assert ola_compat.video_frame_size(1280, 720, **bounds) == (640, 320)  # too large: scaled down
    frame = ola_compat.video_frame(Image.new("RGB", (400, 300), (0, 255, 0)), **bounds)
    assert frame.size == (448, 320) and frame.getpixel((0, 0)) == (127, 127, 127)


@pytest.mark.parametrize("pieces, expected", [
    (["<image>", "Describe."], "<image>\nDescribe."),
    (["<video>", "<audio>", "What happens?"], "<video><audio>\nWhat happens?"),
    (["<image>", "<audio>"], "<image>\nUser's question in speech: <audio>\n"),
    (["<audio>", "Answer it."], "<audio>\nAnswer it."),
    (["Answer it.", "<audio>"], "<audio>\nAnswer it."),
    (["Hello"], "Hello"),
])
def test_user_content_follows_infer_py(pieces, expected):
    assert ola_compat.user_content(pieces, IMAGE_TOKEN, VIDEO_TOKEN, AUDIO_TOKEN) == expected


def test_chat_template_is_qwen_1_5():
    from jinja2 import Template

    rendered = Template(ola_compat.CHAT_TEMPLATE).render(
        messages=[{"role": "user", "content": "Hi"}], add_generation_prompt=True
    )
    assert rendered == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_log_mel_matches_whisper_conventions():
    """Slaney filters (unit area in Hz), 100 frames per second, the 8-decade dynamic range."""
    filters = ola_compat.mel_filters(128)
    assert filters.shape == (128, 201) and filters.dtype == torch.float32
    rng = np.random.default_rng(0)
    mel = ola_compat.log_mel_spectrogram(rng.standard_normal(480000).astype(np.float32) * 0.1)
    assert mel.shape == (128, 3000) and float(mel.max() - mel.min()) <= 2.0 + 1e-6


def test_ola_mode_chunks_long_audio_into_30s_pieces(micro):
    _, processor = micro
    settings = {**processor.settings.__dict__, "preprocessing": "ola", "audio_padding": "fixed", "use_beats": True}
    from omniola.processing_ola import OlaProcessorSettings
    from transformers import WhisperFeatureExtractor

    ola = OlaProcessor(processor.tokenizer, WhisperFeatureExtractor(feature_size=20), OlaProcessorSettings(**settings))
    samples = np.random.default_rng(0).standard_normal(16000 * 45).astype(np.float32) * 0.1  # 45 s
    out = ola._process_audio([samples])
    assert out["input_features"].shape == (2, 20, 3000) and out["audio_num_chunks"].tolist() == [2]
    assert out["audio_values"].shape == (2, 480000) and bool(out["audio_values"][1, 240000:].eq(0).all())
    second = np.pad(samples[480000:], (0, 480000 - (len(samples) - 480000)))
    torch.testing.assert_close(out["input_features"][1], ola_compat.log_mel_spectrogram(second, 20))
    assert ola.num_audio_tokens(len(samples)) == 2 * (1500 // 5 + 1) + 2


def test_ola_mode_needs_fixed_audio_padding():
    from omniola.errors import InputError
    from omniola.processing_ola import OlaProcessorSettings

    with pytest.raises(InputError, match="audio_padding='fixed'"):
        OlaProcessorSettings(preprocessing="ola")
