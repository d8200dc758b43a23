"""lmms-eval integration: a local lmms-eval task (JSON lines + YAML + utils.py over PNG, WAV and MP4 files) run
end to end on a micro random model, with its answers and log-likelihoods checked against omniola's own generation
and a direct forward pass."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read by `datasets` at import
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("lmms_eval")

from conftest import micro_config, micro_processor, micro_tokenizer, tone
from lmms_eval.api.instance import Instance

from omniola import OlaForConditionalGeneration
from omniola.data.tiny_world import write_video
from omniola.errors import ConfigError, InputError, MediaError
from omniola.evaluation.lmms_eval_adapter import (
    MODEL_NAME,
    OmniolaLMMS,
    cut_at_stop,
    lmms_eval_manifest,
    run_lmms_eval,
)
from omniola.inference import load_model

QA, MC = "omniola_local_qa", "omniola_local_mc"
CHOICES = ["red", "green", "blue"]
MAX_NEW_TOKENS = 10

UTILS = '''
from pathlib import Path

import soundfile
from PIL import Image

HERE = Path(__file__).parent


def doc_to_visual(doc):
    visuals = []
    if doc["image"]:
        visuals.append(Image.open(HERE / doc["image"]).convert("RGB"))
    if doc["audio"]:  # as a decoded `datasets.Audio` value
        samples, rate = soundfile.read(HERE / doc["audio"], dtype="float32")
        visuals.append({"array": samples, "sampling_rate": rate})
    if doc["video"]:
        visuals.append(str(HERE / doc["video"]))
    return visuals


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(results[0] == doc["answer"])}
'''


def _rows() -> list[dict]:
    rows = [{"image": f"media/img{k}.png", "audio": None, "video": None, "question": f"What colour is shape {k}?",
             "answer": name, "label": k} for k, name in enumerate(CHOICES)]
    rows.append({"image": None, "audio": "media/beep.wav", "video": None, "question": "What do you hear?",
                 "answer": "a beep", "label": 0})
    rows.append({"image": None, "audio": None, "video": "media/clip.mp4", "question": "What moves?",
                 "answer": "a square", "label": 2})
    return rows


def _write_media(folder: Path) -> None:
    (folder / "media").mkdir(parents=True, exist_ok=True)
    for k, (color, size) in enumerate([((230, 20, 20), (40, 32)), ((20, 200, 40), (24, 48)),
                                       ((30, 40, 220), (64, 64))]):
        Image.new("RGB", size, color).save(folder / "media" / f"img{k}.png")
    soundfile.write(folder / "media" / "beep.wav", tone(1.0, 880.0), 16000)
    frames = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    for t in range(4):
        frames[t, 8:16, 4 + 6 * t:12 + 6 * t] = 255
    write_video(folder / "media" / "clip.mp4", frames, 4, tone(1.0))


def doc_to_visual(folder: Path):
    """The task's `doc_to_visual`, for the direct calls (same as the task's utils.py)."""

    def visuals(doc):
        out = []
        if doc["image"]:
            out.append(Image.open(folder / doc["image"]).convert("RGB"))
        if doc["audio"]:
            samples, rate = soundfile.read(folder / doc["audio"], dtype="float32")
            out.append({"array": samples, "sampling_rate": rate})
        if doc["video"]:
            out.append(str(folder / doc["video"]))
        return out

    return visuals


def messages(folder: Path, doc: dict) -> list[dict]:
    """What the adapter should build for a document: its media, then the question, in one user turn."""
    parts = []
    if doc["image"]:
        parts.append({"type": "image", "image": Image.open(folder / doc["image"]).convert("RGB")})
    if doc["audio"]:
        samples, rate = soundfile.read(folder / doc["audio"], dtype="float32")
        parts.append({"type": "audio", "audio": (samples, rate)})
    if doc["video"]:
        parts.append({"type": "video", "video": str(folder / doc["video"])})
    return [{"role": "user", "content": [*parts, {"type": "text", "text": doc["question"]}]}]


def reference_answers(model, proc, conversations, max_new_tokens, stop) -> list[str]:
    """transformers' own greedy `generate`, one conversation at a time, cut at the stop string."""
    answers = []
    for conversation in conversations:
        inputs = proc.apply_chat_template([conversation], add_generation_prompt=True)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        text = proc.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        answers.append(cut_at_stop(text, [stop]).strip())
    return answers


def direct_loglikelihood(model, proc, conversation, continuation) -> tuple[float, bool]:
    """Sum of log-probabilities of the continuation's tokens after the prompt, from one plain forward pass over
    `input_ids` with the media (the model's own placeholder merge), and whether each is the argmax."""
    inputs = proc.apply_chat_template([conversation], add_generation_prompt=True)
    cont = torch.tensor(proc.tokenizer(continuation, add_special_tokens=False)["input_ids"])
    ids = torch.cat([inputs["input_ids"][0], cont])[None]
    media = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **media).logits[0]
    prompt = inputs["input_ids"].shape[1]
    logprobs = logits[prompt - 1:-1].float().log_softmax(-1)  # (C, V)
    return float(logprobs[torch.arange(len(cont)), cont].sum()), bool((logprobs.argmax(-1) == cont).all())


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A saved micro model, a local lmms-eval task folder, the documents and the reference answers."""
    root = tmp_path_factory.mktemp("lmms")
    torch.manual_seed(0)
    tokenizer = micro_tokenizer()
    config = micro_config(tokenizer)
    model = OlaForConditionalGeneration(config).eval()
    with torch.no_grad():  # larger random weights than the init: answers that differ from one input to the next
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    proc = micro_processor(tokenizer, config)
    model.save_pretrained(root / "model")
    proc.save_pretrained(root / "model")
    model, proc = load_model(root / "model", device="cpu")

    tasks = root / "tasks"
    _write_media(tasks)
    docs = _rows()
    (tasks / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / "utils.py").write_text(UTILS)
    conversations = [messages(tasks, d) for d in docs]
    full = [reference_answers(model, proc, [c], MAX_NEW_TOKENS, "\0")[0] for c in conversations]
    assert len(set(full)) > 1, "the micro model should answer differently to different inputs"
    middle = len(full[0]) // 2
    stop = full[0][middle:middle + 2]  # cuts the first answer, maybe others
    assert stop.strip() == stop and cut_at_stop(full[0], [stop]) != full[0]
    expected = [cut_at_stop(a, [stop]).strip() for a in full]

    dataset = f'''dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(tasks / "data.jsonl"))}
  cache_dir: {json.dumps(str(root / "hf_datasets"))}
test_split: test
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
metadata:
  version: 0.0
'''
    (tasks / "qa.yaml").write_text(f'''task: {QA}
{dataset}output_type: generate_until
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {MAX_NEW_TOKENS}
  until: [{json.dumps(stop)}]
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
''')
    (tasks / "mc.yaml").write_text(f'''task: {MC}
{dataset}output_type: multiple_choice
doc_to_choice: {json.dumps(CHOICES)}
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
''')
    return {"root": root, "model_dir": root / "model", "tasks": tasks, "model": model, "proc": proc,
            "docs": docs, "conversations": conversations, "stop": stop, "expected": expected}


def _instances(request_type: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=request_type, arguments=a, idx=0, metadata={"task": "t", "doc_id": a[-3],
                                                                                "repeats": 1}) for a in args]


def _adapter(world, **kwargs) -> OmniolaLMMS:
    lm = OmniolaLMMS(model=world["model"], processor=world["proc"], progress=False, **kwargs)
    lm.task_dict = {"t": {"test": world["docs"]}}
    return lm


def test_local_tasks_end_to_end(world, tmp_path):
    """lmms-eval runs both local tasks on the model loaded by name from its directory: one result per document,
    answers equal to omniola's own generation, option scores equal to a direct forward pass."""
    results = run_lmms_eval([QA, MC], model=world["model_dir"], include_path=[world["tasks"]],
                            include_defaults=False, device="cpu", out=tmp_path, progress=False)
    docs, expected = world["docs"], world["expected"]
    assert set(results["results"]) == {QA, MC}
    assert results["n-samples"][QA]["effective"] == results["n-samples"][MC]["effective"] == len(docs)

    qa = sorted(results["samples"][QA], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in qa] == list(range(len(docs)))
    assert [s["filtered_resps"][0] for s in qa] == expected
    assert results["results"][QA]["exact_match,none"] == pytest.approx(
        np.mean([e == d["answer"] for e, d in zip(expected, docs)]))

    mc = sorted(results["samples"][MC], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in mc] == list(range(len(docs)))
    model, proc = world["model"], world["proc"]
    right = []
    for sample, doc, conversation in zip(mc, docs, world["conversations"]):
        assert len(sample["filtered_resps"]) == len(CHOICES)
        direct = [direct_loglikelihood(model, proc, conversation, " " + c) for c in CHOICES]
        for (value, greedy), (logprob, is_greedy) in zip(sample["filtered_resps"], direct):
            assert value == pytest.approx(-logprob, rel=1e-4, abs=1e-4)  # an option's score is its NLL (argmin)
            assert greedy == is_greedy
        right.append(int(np.argmax([lp for lp, _ in direct]) == doc["label"]))
        assert sample["acc"] == right[-1]
    assert results["results"][MC]["acc,none"] == pytest.approx(np.mean(right))

    written = json.loads((tmp_path / "lmms_eval_results.json").read_text())
    assert written["results"] == json.loads(json.dumps(results["results"]))
    lines = (tmp_path / f"lmms_eval_samples_{QA}.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["filtered_resps"][0] for line in lines) == sorted(expected)


def test_batches_group_generation_settings_and_keep_order(world):
    """Requests with equal settings share a batch; answers equal omniola's batched generation, in request order."""
    lm = _adapter(world, batch_size=8)
    visuals, stop = doc_to_visual(world["tasks"]), world["stop"]
    settings = [{"max_new_tokens": MAX_NEW_TOKENS, "until": [stop]}, {"max_new_tokens": 4, "until": stop}]
    args = [(d["question"], dict(settings[k % 2]), visuals, k, "t", "test") for k, d in enumerate(world["docs"])]
    answers = lm.generate_until(_instances("generate_until", args))

    model, proc, conversations = world["model"], world["proc"], world["conversations"]
    expected = [None] * len(args)
    for parity, limit in ((0, MAX_NEW_TOKENS), (1, 4)):
        rows = list(range(parity, len(args), 2))
        for k, text in zip(rows, reference_answers(model, proc, [conversations[k] for k in rows], limit, stop)):
            expected[k] = text
    assert answers == expected


def test_loglikelihood_values_and_greedy_flag(world):
    model, proc, conversations = world["model"], world["proc"], world["conversations"]
    lm = _adapter(world, batch_size=2)
    visuals = doc_to_visual(world["tasks"])
    # a greedy continuation: the model's first greedy tokens, as long as they are printable (they round-trip
    # through the micro tokenizer's text)
    greedy_text, doc_id = "", None
    for k, conversation in enumerate(conversations):
        inputs = proc.apply_chat_template([conversation], add_generation_prompt=True)
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, temperature=None, top_p=None, top_k=None)
        tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
        printable = "".join(chr(t) for t in tokens[:next((i for i, t in enumerate(tokens) if not 32 < t < 127),
                                                          len(tokens))])
        if printable:
            greedy_text, doc_id = printable, k
            break
    assert greedy_text, "no document starts its greedy answer with a printable token"
    question = world["docs"][doc_id]["question"]
    args = [(question, greedy_text, visuals, doc_id, "t", "test"),
            (question, " red", visuals, doc_id, "t", "test"),
            (question, lambda doc: " red", visuals, doc_id, "t", "test"),  # a `loglikelihood` task's doc_to_target
            (question, "", visuals, doc_id, "t", "test")]
    results = lm.loglikelihood(_instances("loglikelihood", args))
    pairs = [getattr(r, "text", r) for r in results]  # lmms-eval 0.7.3: wrapped to survive its output unwrapping

    logprob, is_greedy = direct_loglikelihood(model, proc, conversations[doc_id], greedy_text)
    assert is_greedy and pairs[0][1] is True
    assert pairs[0][0] == pytest.approx(-logprob, rel=1e-4, abs=1e-4)
    red, red_greedy = direct_loglikelihood(model, proc, conversations[doc_id], " red")
    assert pairs[1] == (pytest.approx(-red, rel=1e-4, abs=1e-4), red_greedy)
    assert pairs[2] == (pytest.approx(red, rel=1e-4, abs=1e-4), red_greedy)
    assert pairs[3] == (0.0, True)


def test_multi_round(world):
    lm = _adapter(world)
    visuals, docs = doc_to_visual(world["tasks"]), world["docs"]

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None, **_):
        if round_idx >= 2:
            return None, None, True, previous_output, None
        return visuals(docs[1]), docs[1]["question"], False, previous_output, {"round": round_idx}

    args = (docs[0]["question"], {"max_new_tokens": MAX_NEW_TOKENS}, visuals, doc_to_text, 0, "t", "test")
    [rounds] = lm.generate_until_multi_round(_instances("generate_until_multi_round", [args]))
    model, proc, conversations = world["model"], world["proc"], world["conversations"]
    expected = [reference_answers(model, proc, [conversations[k]], MAX_NEW_TOKENS, "\0")[0] for k in (0, 1)]
    assert rounds == expected


def test_registration(world):
    import lmms_eval.models

    assert lmms_eval.models.get_model(MODEL_NAME) is OmniolaLMMS
    lm = lmms_eval.models.get_model(MODEL_NAME).create_from_arg_string(
        f"pretrained={world['model_dir']},max_new_tokens=7", {"batch_size": "2", "device": "cpu"})
    assert (lm.batch_size, lm.max_new_tokens, lm.device.type) == (2, 7, "cpu")
    ours = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == MODEL_NAME]
    if not ours:
        pytest.skip("omniola's lmms_eval.models entry point is not installed (re-run pip install -e .)")
    assert ours[0].load() is lmms_eval_manifest
    manifest = lmms_eval_manifest()
    assert manifest.simple_class_path == "omniola.evaluation.lmms_eval_adapter.OmniolaLMMS"


def test_bad_inputs_name_what_failed(world, tmp_path):
    with pytest.raises(InputError, match="nowhere"):
        OmniolaLMMS(pretrained=tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="temperature"):
        OmniolaLMMS(model=world["model"], processor=world["proc"], temperature=0)
    with pytest.raises(ConfigError, match="batch_size"):
        OmniolaLMMS(model=world["model"], processor=world["proc"], batch_size="auto")

    (tmp_path / "broken.png").write_bytes(b"not a png")
    lm = _adapter(world, batch_size=4)
    docs = [{"question": "ok?", "path": str(world["tasks"] / "media" / "img0.png")},
            {"question": "broken?", "path": str(tmp_path / "broken.png")}]
    lm.task_dict = {"t": {"test": docs}}
    args = [(d["question"], {"max_new_tokens": 2}, lambda doc: [doc["path"]], k, "t", "test")
            for k, d in enumerate(docs)]
    with pytest.raises(MediaError, match=r"task 't' \(test split\), doc 1.*broken\.png"):
        lm.generate_until(_instances("generate_until", args))

    def missing(doc):
        raise FileNotFoundError(doc["question"])

    with pytest.raises(MediaError, match=r"doc 0: doc_to_visual failed: FileNotFoundError"):
        lm.loglikelihood(_instances("loglikelihood", [("q", " a", missing, 0, "t", "test")]))
    with pytest.raises(ConfigError, match="nope"):
        run_lmms_eval(["nope"], include_path=[world["tasks"]], include_defaults=False, lm=lm)


def test_cli(world, tmp_path):
    from omniola.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["eval", "--lmms-eval", QA, "--include-path", str(world["tasks"]), "--model",
                                      str(world["model_dir"]), "--limit", "2", "--device", "cpu", "--quiet",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert QA in result.output and "exact_match" in result.output
    lines = [json.loads(line) for line in (out / f"lmms_eval_samples_{QA}.jsonl").read_text().splitlines()]
    assert sorted((s["doc_id"], s["filtered_resps"][0]) for s in lines) == list(enumerate(world["expected"][:2]))

    neither = CliRunner().invoke(app, ["eval", "--model", str(world["model_dir"])])
    assert neither.exit_code == 2 and "--task or --lmms-eval" in neither.output
    mixed = CliRunner().invoke(app, ["eval", "--lmms-eval", QA, "--data", "x.tsv", "--model", str(world["model_dir"])])
    assert mixed.exit_code == 2 and "--data: not used with --lmms-eval" in mixed.output
