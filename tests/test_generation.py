"""The generation engine (`omniola.generation`): events, continuous batching, cancellation, stop strings, speech,
and no library warnings, on a micro random model whose answers differ from prompt to prompt."""

from __future__ import annotations

import asyncio
import time
import warnings

import pytest
import torch

from conftest import micro_model
from omniola.errors import InputError
from omniola.generation import Done, Engine, GenerationOptions, SpeechDelta, StopTrimmer, TextDelta
from omniola.speech import ToneBackend, split_sentences

PROMPTS = ["hi", "what is in this picture? tell me more", "a", "the quick brown fox jumps over the lazy dog " * 3]


@pytest.fixture(scope="module")
def varied():
    """(model, processor): the micro model with large random LLM weights, so that different prompts get different
    greedy answers (the default initialisation answers every prompt alike)."""
    model, processor = micro_model()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.model.language_model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return model, processor


def _inputs(processor, text):
    return processor.apply_chat_template([{"role": "user", "content": text}])


def _reference(model, processor, text, n):
    """transformers' own greedy `generate`: the token ids of the answer."""
    inputs = _inputs(processor, text)
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_options_are_checked():
    for bad in (dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(stop=("",)),
                dict(top_k=-1), dict(repetition_penalty=0)):
        with pytest.raises(InputError):
            GenerationOptions(**bad)
    assert GenerationOptions().greedy and not GenerationOptions(temperature=0.7).greedy


def test_stop_trimmer_holds_back_only_what_could_begin_a_stop():
    trimmer = StopTrimmer(["END", "\n\n"])
    assert trimmer.push("abc") == "abc"  # nothing that could begin a stop string: shown at once
    assert trimmer.push("xE") == "x"  # "E" may begin "END"
    assert trimmer.push("Z") == "EZ"  # it did not
    assert trimmer.push("\n") == ""
    assert trimmer.push("\n tail") == "" and trimmer.stopped
    other = StopTrimmer(["END"])
    assert other.push("abEN") == "ab" and other.flush() == "EN"


def test_engine_matches_generate_and_batched_equals_alone(varied):
    model, processor = varied
    engine = Engine(model, processor, max_batch=4)
    options = GenerationOptions(max_new_tokens=12)
    alone = [engine.generate(_inputs(processor, p), options) for p in PROMPTS]
    together = [r.result() for r in [engine.submit(_inputs(processor, p), options) for p in PROMPTS]]
    assert engine.max_batch_seen == 4
    for prompt, a, t in zip(PROMPTS, alone, together):
        expected = processor.decode(_reference(model, processor, prompt, 12), skip_special_tokens=True)
        assert a.text == expected and t.text == expected
        assert a.usage.completion_tokens == t.usage.completion_tokens
        assert a.finish_reason == t.finish_reason
    assert len({a.text for a in alone}) == len(PROMPTS)  # the answers differ: the comparison means something
    engine.close()


def test_join_and_leave_mid_batch_keep_the_tokens(varied):
    model, processor = varied
    engine = Engine(model, processor, max_batch=4)
    expected = {p: engine.generate(_inputs(processor, p), GenerationOptions(max_new_tokens=n)).text
                for p, n in ((PROMPTS[0], 30), (PROMPTS[1], 4), (PROMPTS[3], 10))}
    long = engine.submit(_inputs(processor, PROMPTS[0]), GenerationOptions(max_new_tokens=30))
    steps = engine.steps
    while engine.steps < steps + 5:  # the long one is decoding
        time.sleep(0.001)
    short = engine.submit(_inputs(processor, PROMPTS[1]), GenerationOptions(max_new_tokens=4))  # joins, leaves first
    longer_prompt = engine.submit(_inputs(processor, PROMPTS[3]), GenerationOptions(max_new_tokens=10))
    assert short.result().text == expected[PROMPTS[1]]
    assert longer_prompt.result().text == expected[PROMPTS[3]]
    assert long.result().text == expected[PROMPTS[0]]
    assert engine.max_batch_seen >= 2 and engine.running == 0
    engine.close()


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(varied):
    model, processor = varied
    engine = Engine(model, processor, max_batch=4)
    options = GenerationOptions(max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    alone = engine.generate(_inputs(processor, PROMPTS[1]), options).text
    batch = [engine.submit(_inputs(processor, p), options) for p in (PROMPTS[0], PROMPTS[1], PROMPTS[2])]
    assert [r.result().text for r in batch][1] == alone
    engine.close()


def test_cancel_frees_the_slot_for_the_next_request(varied):
    model, processor = varied
    engine = Engine(model, processor, max_batch=1)
    endless = engine.submit(_inputs(processor, PROMPTS[0]), GenerationOptions(max_new_tokens=3000, ignore_eos=True))
    waiting = engine.submit(_inputs(processor, PROMPTS[2]), GenerationOptions(max_new_tokens=3))
    events = iter(endless)
    next(e for e in events if isinstance(e, TextDelta))  # it is generating; the other waits for its slot
    assert engine.waiting == 1
    endless.cancel()
    assert [e for e in events if isinstance(e, Done)][0].finish_reason == "cancelled"
    done = waiting.result()
    assert done.finish_reason == "length" and done.usage.completion_tokens == 3 and engine.running == 0
    assert endless.usage.completion_tokens < 3000
    engine.close()


def test_stop_strings_end_the_answer(varied):
    model, processor = varied
    engine = Engine(model, processor)
    whole = engine.generate(_inputs(processor, PROMPTS[1]), GenerationOptions(max_new_tokens=20))
    stop = whole.text[4:6]
    assert len(stop) == 2, whole.text
    cut = engine.generate(_inputs(processor, PROMPTS[1]), GenerationOptions(max_new_tokens=20, stop=(stop,)))
    assert cut.text == whole.text[: whole.text.find(stop)] and cut.finish_reason == "stop"
    assert cut.usage.completion_tokens < whole.usage.completion_tokens
    engine.close()


def test_events_of_a_spoken_answer(varied):
    model, processor = varied
    engine = Engine(model, processor)
    voice = ToneBackend()
    events = list(engine.submit(_inputs(processor, PROMPTS[1]), GenerationOptions(max_new_tokens=20), voice=voice))
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    spoken = [e for e in events if isinstance(e, SpeechDelta)]
    done = events[-1]
    assert isinstance(done, Done) and done.text == text and sum(isinstance(e, Done) for e in events) == 1
    assert [s.text for s in spoken] == split_sentences(text)
    assert all(s.audio.size == voice.num_samples(s.text) and s.sample_rate == 16000 for s in spoken)
    assert {"time_to_first_audio_s", "audio_s", "time_to_first_token_s", "tokens_per_s"} <= done.timings.keys()
    engine.close()


def test_a_failing_request_does_not_stop_the_others(varied):
    model, processor = varied
    engine = Engine(model, processor, max_batch=4)
    from PIL import Image

    bad = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image", "image": Image.new("RGB", (40, 30))}, {"type": "text", "text": "what?"}]}])
    bad["pixel_values"] = bad["pixel_values"][:-4]  # patches missing: the model refuses at prefill
    good = [engine.submit(_inputs(processor, p), GenerationOptions(max_new_tokens=8)) for p in PROMPTS[:2]]
    failing = engine.submit(bad, GenerationOptions(max_new_tokens=8))
    with pytest.raises(Exception):
        failing.result()
    for request, prompt in zip(good, PROMPTS[:2]):
        assert request.result().text == processor.decode(_reference(model, processor, prompt, 8),
                                                          skip_special_tokens=True)
    engine.close()


def test_async_events(varied):
    model, processor = varied
    engine = Engine(model, processor)

    async def ask():
        request = engine.submit(_inputs(processor, PROMPTS[0]), GenerationOptions(max_new_tokens=6),
                                loop=asyncio.get_running_loop())
        return [event async for event in request.aevents()]

    events = asyncio.run(ask())
    assert isinstance(events[-1], Done) and events[-1].text == "".join(e.text for e in events[:-1])
    engine.close()


def test_no_library_warnings_from_generation(varied):
    model, processor = varied
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Engine(model, processor).generate(_inputs(processor, PROMPTS[0]), GenerationOptions(max_new_tokens=4))
        model.generate(**_inputs(processor, PROMPTS[0]), max_new_tokens=4, do_sample=False)
    noisy = [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert not noisy, [str(w.message) for w in noisy]


def test_penalties_apply_and_skip_media_placeholders(varied):
    from PIL import Image

    model, processor = varied
    engine = Engine(model, processor)
    with_image = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image", "image": Image.new("RGB", (40, 30))}, {"type": "text", "text": "what?"}]}])
    plain = engine.generate(with_image, GenerationOptions(max_new_tokens=16))
    request = engine.submit(with_image, GenerationOptions(max_new_tokens=16, repetition_penalty=3.0,
                                                          no_repeat_ngram_size=2))
    penalised = request.result()
    vocab = model.config.get_text_config().vocab_size
    ids = [t for t in request.history if t < vocab]  # the prompt's and the answer's, less the image placeholders
    answer_at = len(ids) - penalised.usage.completion_tokens
    pairs = list(zip(ids, ids[1:]))
    assert penalised.text != plain.text
    assert all(pairs[j] not in pairs[:j] for j in range(answer_at - 1, len(pairs)))  # no 2-gram said again
    engine.close()
