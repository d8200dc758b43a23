"""LLM weight formats at inference (`load_model(..., weights=)`, `--weights`): each loads and generates, stays close to
float32 (closely enough that a broken kernel fails), unusable formats are clear errors, and every command passes
the flag on."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from omniola import weights as weight_formats
from omniola.cli import app
from omniola.errors import OmniolaError, WeightFormatError
from omniola.generation import Engine, GenerationOptions
from omniola.inference import load_model
from omniola.weights import (
    GGUF_FORMATS,
    WEIGHT_FORMATS,
    apply_weight_format,
    check_weight_format,
    default_weight_format,
)

TORCH_FORMATS = [f for f in WEIGHT_FORMATS if f not in GGUF_FORMATS]  # the gguf-* ones: tests/test_gguf.py

AGREEMENT = 0.9  # top-1 agreement with float32; measured on this micro model: bf16 1.0, int8 1.0, int4 0.98
RELATIVE_ERROR = 0.1  # |logits - float32 logits| / |float32 logits|; measured: bf16 0.005, int8 0.008, int4 0.04


@pytest.fixture(autouse=True)
def _no_compile(monkeypatch):
    """int8 compiles the LLM with inductor (minutes on 2 cores); the tests check the quantized numbers eagerly."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)


def _requires(weights: str) -> None:
    if weights in ("int8", "int4"):
        pytest.importorskip("torchao")
    if weights == "int8" and not weight_formats.cpu_has_fast_bf16():
        pytest.skip("int8 computes in bfloat16; this CPU has no native bfloat16 kernels")


def _agreement(model, reference, input_ids) -> tuple[float, float]:
    """Top-1 agreement and relative logit error of `model` against `reference`, teacher-forced on `input_ids`."""
    with torch.inference_mode():
        ref = reference(input_ids=input_ids).logits.float()  # (B, L, V)
        out = model(input_ids=input_ids).logits.float()
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return agree, ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("weights", TORCH_FORMATS)
def test_each_format_loads_and_generates(micro_dir, weights):
    _requires(weights)
    model, processor = load_model(micro_dir, device="cpu", weights=weights)
    reference, _ = load_model(micro_dir, device="cpu", weights="fp32")
    assert model.weight_format == weights
    inputs = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hello"}]}])
    options = GenerationOptions(max_new_tokens=8, ignore_eos=True)
    done = Engine(model, processor).generate(inputs, options)
    assert done.text == Engine(reference, processor).generate(inputs, options).text  # greedy: as float32
    assert done.usage.completion_tokens == 8


@pytest.mark.parametrize("weights", TORCH_FORMATS)
def test_format_agrees_with_float32(micro, weights):
    _requires(weights)
    reference, _ = micro
    input_ids = torch.randint(0, 250, (4, 24))
    agree, error = _agreement(apply_weight_format(copy.deepcopy(reference), weights), reference, input_ids)
    assert agree >= AGREEMENT and error <= RELATIVE_ERROR, (weights, agree, error)


def test_the_agreement_check_fails_a_broken_kernel(micro):
    """The thresholds above are tight enough to catch a kernel that reads its weights wrongly (rows out of order)."""
    reference, _ = micro
    broken = copy.deepcopy(reference)
    for module in broken.model.language_model.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.data = module.weight.data[torch.randperm(module.weight.shape[0])]
    agree, error = _agreement(broken, reference, torch.randint(0, 250, (4, 24)))
    assert agree < AGREEMENT and error > RELATIVE_ERROR


def test_only_the_llm_changes_format(micro):
    model, _ = micro
    apply_weight_format(model, "bf16")
    assert model.lm_head.weight.dtype == model.model.language_model.embed_tokens.weight.dtype == torch.bfloat16
    assert next(model.model.vision_tower.parameters()).dtype == torch.float32
    assert next(model.model.audio_encoder.parameters()).dtype == torch.float32


def test_default_format_keeps_the_answers_on_a_cpu(micro_dir):
    assert default_weight_format(torch.device("cpu")) == "fp32"  # bf16 changes answers (benchmarks/README.md)
    assert default_weight_format(torch.device("cuda")) == "bf16"
    assert load_model(micro_dir, device="cpu")[0].weight_format == "fp32"
    assert load_model(micro_dir, device="cpu", dtype=torch.bfloat16)[0].weight_format == "bf16"  # dtype alone


def test_unknown_format_is_a_clear_error(micro_dir):
    with pytest.raises(WeightFormatError, match=r"unknown weight format 'int3'.*fp32, bf16, int8, int4"):
        load_model(micro_dir, device="cpu", weights="int3")


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_missing_torchao_is_a_clear_error(monkeypatch, micro_dir, weights):
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao -> ImportError
    with pytest.raises(WeightFormatError, match=rf"'{weights}' needs torchao.*omniola\[quant\]"):
        load_model(micro_dir, device="cpu", weights=weights)


def test_formats_this_machine_cannot_run_are_clear_errors(monkeypatch):
    pytest.importorskip("torchao")
    with pytest.raises(WeightFormatError, match="'int4' runs on the CPU only"):
        check_weight_format("int4", torch.device("cuda"))
    monkeypatch.setattr(weight_formats, "cpu_has_fast_bf16", lambda: False)
    with pytest.raises(WeightFormatError, match="'int8' .* no native bfloat16"):
        check_weight_format("int8", torch.device("cpu"))
    monkeypatch.delattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", raising=False)
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        with pytest.raises(WeightFormatError, match=r"'int4' needs torch's CPU int4 kernel"):
            check_weight_format("int4", torch.device("cpu"))


class _Stop(OmniolaError):
    pass


@pytest.mark.parametrize("command", [
    ["chat", "hi"],
    ["demo"],
    ["serve"],
    ["web"],
    ["eval", "--task", "tiny", "--data", "{world}"],
])
def test_every_command_passes_the_weights_flag(monkeypatch, micro_dir, tmp_path, command):
    if command[0] == "serve":
        pytest.importorskip("uvicorn")
    if command[0] == "web":
        pytest.importorskip("gradio")
    seen = {}

    def fake_load_model(path, **kwargs):
        seen.update(kwargs)
        raise _Stop("stopped after load_model")

    import omniola.inference

    monkeypatch.setattr(omniola.inference, "load_model", fake_load_model)
    if command[0] == "eval":  # the task is loaded before the model: a tiny world of one image question
        import omniola.evaluation.tasks as tasks

        monkeypatch.setattr(tasks, "load_task", lambda *args, **kwargs: None)
    args = [a.replace("{world}", str(tmp_path)) for a in command]
    result = CliRunner().invoke(app, [*args, "--model", str(micro_dir), "--weights", "int4"])
    assert "stopped after load_model" in result.output, result.output
    assert seen["weights"] == "int4"


def test_converting_the_llm_leaves_the_encoders_exact(micro_dir):
    """The LLM's float32 checkpoint pages are released after conversion; the encoders, which share the mapped file,
    read exactly the same weights."""
    converted, _ = load_model(micro_dir, device="cpu", weights="bf16")
    reference, _ = load_model(micro_dir, device="cpu", weights="fp32")
    ours = dict(converted.named_parameters())
    for name, param in reference.named_parameters():
        if not name.startswith(("model.language_model.", "lm_head.")):
            assert torch.equal(ours[name], param), name


def test_importing_omniola_prints_nothing():
    """With the quant extra installed, transformers imports torchao, whose import warns about CUDA-only extensions:
    none of that may reach a user of any command."""
    run = subprocess.run([sys.executable, "-c", "import omniola.inference, omniola.cli"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and run.stderr == "" and run.stdout == ""
