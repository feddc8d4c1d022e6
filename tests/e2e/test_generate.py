"""Generation with SmolLM2-135M-Instruct on Ray workers (float32, CPU), against transformers."""

from __future__ import annotations

import math

import pytest
import torch

from driver import LLM, SamplingParams
from tests.helpers import SMOLLM2_PROMPTS as PROMPTS
from tests.helpers import reference_logits

NEW_TOKENS = 16
ENGINE = dict(max_model_len=512, max_num_batched_tokens=512, kv_cache_memory_bytes=64 * 2**20, device="cpu")
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def references(smollm2_greedy_references) -> list[list[int]]:
    """transformers' greedy tokens (16) for each prompt alone."""
    return smollm2_greedy_references


@pytest.fixture(scope="module")
def llm(ray_cluster, smollm2_gguf):
    with LLM(str(smollm2_gguf), **ENGINE) as engine:
        yield engine


def check_greedy(llm: LLM, references: list[list[int]]) -> None:
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.prompt for o in outputs] == PROMPTS
    tokenizer = llm.get_tokenizer()
    for out, ref in zip(outputs, references):
        assert out.outputs[0].text == tokenizer.decode(ref, skip_special_tokens=True)
        assert out.outputs[0].token_ids == ref
        assert out.finished and out.outputs[0].finish_reason == "length"


def test_greedy_batch_matches_transformers_one_prompt_at_a_time(llm, references) -> None:
    check_greedy(llm, references)


def test_three_ranks_logits_greedy_text_and_slices_read(ray_cluster, smollm2_gguf, smollm2_reference, references) -> None:
    with LLM(str(smollm2_gguf), tensor_parallel_size=3, **ENGINE) as llm3:
        check_greedy(llm3, references)
        prompts = [[1, 504, 3575, 282, 4649, 314], [9519, 30, 2, 17, 4, 1000, 30000]]
        for mine, ref in zip(llm3.prompt_logits(prompts), reference_logits(smollm2_reference[1], prompts)):
            torch.testing.assert_close(mine, ref, atol=1e-4, rtol=0)
        for rank in llm3.load_report.ranks:
            # a third of every split tensor, quantization blocks whole; norms (KiB) are read by every rank
            assert rank.bytes_read <= 0.36 * rank.checkpoint_bytes, rank
            assert rank.pages_touched * 4096 <= 0.36 * rank.checkpoint_bytes + 4096 * 300, rank


def test_a_pool_too_small_for_the_batch_preempts_and_still_finishes(ray_cluster, smollm2_gguf, references) -> None:
    small = dict(ENGINE, num_gpu_blocks_override=16, max_model_len=256)  # 256 tokens for ~400 wanted at once
    with LLM(str(smollm2_gguf), **small) as tight:
        keep = [0, 1, 3, 4, 5, 9, 11, 14]
        long_prompts = [PROMPTS[i] for i in keep]
        outputs = tight.generate(long_prompts, GREEDY, use_tqdm=False)
        assert tight.stats()["preemptions"] > 0
        assert [o.outputs[0].token_ids for o in outputs] == [references[i] for i in keep]


def test_prefix_cache_hits_give_transformers_greedy_tokens(llm, smollm2_reference) -> None:
    """A long prompt computed once; then again (all its full blocks hit) and extended (its
    prefix hits): every answer is transformers' greedy continuation."""
    from tests.helpers import transformers_greedy

    tokenizer = llm.get_tokenizer()
    long_ids = tokenizer(" ".join(PROMPTS[:6]))["input_ids"]
    extended = long_ids + tokenizer(" And so")["input_ids"]
    assert len(long_ids) > 2 * 16  # two full blocks at least (block_size 16)
    refs = [transformers_greedy(smollm2_reference[1], ids, 8) for ids in (long_ids, extended)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    before = llm.stats()["prefix_cache_hits"]
    first = llm.generate([{"prompt_token_ids": long_ids}], params, use_tqdm=False)[0]
    again, longer = llm.generate([{"prompt_token_ids": long_ids}, {"prompt_token_ids": extended}], params, use_tqdm=False)
    assert [first.outputs[0].token_ids, again.outputs[0].token_ids, longer.outputs[0].token_ids] == [refs[0], refs[0], refs[1]]
    stats = llm.stats()
    assert stats["prefix_cache_hits"] - before >= 2 * (len(long_ids) // 16) * 16 - 32
    assert 0 < stats["prefix_cache_hit_rate"] <= 1


def test_seeded_sampling_is_reproducible_within_and_across_batches(llm) -> None:
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=1234)
    alone = llm.generate("Once upon a time", seeded, use_tqdm=False)[0].outputs[0].text
    again = llm.generate("Once upon a time", seeded, use_tqdm=False)[0].outputs[0].text
    crowd = llm.generate(
        ["The capital of France is", "Once upon a time", "Roses are red,", "Once upon a time"],
        [SamplingParams(temperature=0.8, max_tokens=12), seeded, SamplingParams(max_tokens=20, seed=5), seeded],
        use_tqdm=False,
    )
    assert alone == again == crowd[1].outputs[0].text == crowd[3].outputs[0].text
    other = llm.generate("Once upon a time", SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=99), use_tqdm=False)
    assert other[0].outputs[0].text != alone


def test_n_completions(llm) -> None:
    out = llm.generate("My favourite food is", SamplingParams(n=3, temperature=1.0, max_tokens=10, seed=3), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    first = llm.generate("My favourite food is", SamplingParams(temperature=1.0, max_tokens=10, seed=3), use_tqdm=False)[0]
    assert first.outputs[0].token_ids == out.outputs[0].token_ids


def test_stop_strings_stop_tokens_and_lengths(llm, references) -> None:
    tokenizer = llm.get_tokenizer()
    full = tokenizer.decode(references[0], skip_special_tokens=True)  # " Paris.\n\nThe answer is: ..."
    stop = full[8:12]
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=16, stop=[stop, "never seen"]), use_tqdm=False)[
        0
    ].outputs[0]
    assert out.text == full[: full.index(stop)] and out.finish_reason == "stop" and out.stop_reason == stop
    kept = llm.generate(
        PROMPTS[0], SamplingParams(temperature=0, max_tokens=16, stop=stop, include_stop_str_in_output=True), use_tqdm=False
    )[0]
    assert kept.outputs[0].text.endswith(stop)
    third = references[0][2]
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[third]), use_tqdm=False)[
        0
    ].outputs[0]
    assert out.token_ids == references[0][:3] and out.finish_reason == "stop" and out.stop_reason == third
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == references[0][:5] and out.finish_reason == "length"


def test_end_of_sequence_min_tokens_and_ignore_eos(llm) -> None:
    chat = "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"
    eos = llm.get_tokenizer().eos_token_id
    ended = llm.generate(chat, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0].outputs[0]
    assert ended.finish_reason == "stop" and ended.stop_reason is None and ended.token_ids[-1] == eos
    assert "<|im_end|>" not in ended.text
    n = len(ended.token_ids)
    longer = llm.generate(chat, SamplingParams(temperature=0, max_tokens=n + 4, min_tokens=n + 2), use_tqdm=False)[0].outputs[0]
    assert len(longer.token_ids) >= n + 2 and eos not in longer.token_ids[: n + 1]
    ignoring = llm.generate(chat, SamplingParams(temperature=0, max_tokens=n + 3, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert len(ignoring.token_ids) == n + 3 and ignoring.finish_reason == "length"


def test_logprobs_and_prompt_logprobs_match_transformers(llm, smollm2_reference) -> None:
    hf = smollm2_reference[1]
    out = llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=6, logprobs=3, prompt_logprobs=2), use_tqdm=False)[0]
    ids = out.prompt_token_ids + out.outputs[0].token_ids
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].log_softmax(-1)
    prompt_len = len(out.prompt_token_ids)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == prompt_len
    for pos in range(1, prompt_len):
        entry = out.prompt_logprobs[pos]
        assert math.isclose(entry[ids[pos]].logprob, float(ref[pos - 1, ids[pos]]), abs_tol=1e-3)
        assert len(entry) in (2, 3)
    total = 0.0
    for step, entry in enumerate(out.outputs[0].logprobs):
        token = out.outputs[0].token_ids[step]
        assert entry[token].rank == 1, "greedy picks the most likely token"
        assert math.isclose(entry[token].logprob, float(ref[prompt_len - 1 + step, token]), abs_tol=1e-3)
        assert len(entry) == 3 and entry[token].decoded_token == llm.get_tokenizer().decode([token])
        total += entry[token].logprob
    assert math.isclose(out.outputs[0].cumulative_logprob, total, rel_tol=1e-6)


def test_chat_uses_the_chat_template(llm, smollm2_reference) -> None:
    messages = [{"role": "user", "content": "What is 2+2?"}]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    tokenizer = llm.get_tokenizer()
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert out.prompt_token_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ref = smollm2_reference[1].generate(torch.tensor([out.prompt_token_ids]), max_new_tokens=12, do_sample=False)
    assert out.outputs[0].token_ids == ref[0, len(out.prompt_token_ids) :].tolist()[: len(out.outputs[0].token_ids)]
    two = llm.chat(
        [messages, [{"role": "user", "content": "Hello"}]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False
    )
    assert len(two) == 2 and two[0].outputs[0].token_ids == out.outputs[0].token_ids[:4]


def test_streaming_and_a_rejected_prompt_while_it_runs(llm) -> None:
    stream = llm.stream(["Once upon a time", "Roses are red,"], SamplingParams(temperature=0, max_tokens=20))
    first = next(stream)
    assert not first.finished
    too_long = "word " * 600
    with pytest.raises(ValueError, match=r"has \d+ tokens, and max_model_len is 512"):
        llm.generate(too_long, use_tqdm=False)
    seen: dict[str, list[str]] = {}
    for out in [first, *stream]:
        seen.setdefault(out.request_id, []).append(out.outputs[0].text)
    final = llm.generate(["Once upon a time", "Roses are red,"], SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)
    texts = sorted(seen.values(), key=len)
    for chunks in seen.values():
        assert all(b.startswith(a) for a, b in zip(chunks, chunks[1:])), "streamed text only grows"
    assert sorted(t[-1] for t in texts) == sorted(o.outputs[0].text for o in final)


def test_outputs_metrics_and_prompt_forms(llm) -> None:
    ids = llm.get_tokenizer()("Roses are red,")["input_ids"]
    forms = llm.generate(["Roses are red,", {"prompt_token_ids": ids}, ids, {"prompt": "Roses are red,"}], GREEDY, use_tqdm=False)
    assert len({tuple(o.outputs[0].token_ids) for o in forms}) == 1
    assert forms[1].prompt is None and forms[0].prompt_token_ids == ids
    m = forms[0].metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time
    with pytest.raises(TypeError, match="prompt 0 is a float"):
        llm.generate([1.5], use_tqdm=False)
    with pytest.raises(ValueError, match="2 prompts but 3 sampling parameters"):
        llm.generate(["a", "b"], [GREEDY] * 3, use_tqdm=False)
    with pytest.raises(
        ValueError, match=r"stop_token_ids of prompt 'a' name token ids outside the vocabulary \[0, 49152\): \[49152\]"
    ):
        llm.generate(["a"], SamplingParams(stop_token_ids=[49152], min_tokens=1), use_tqdm=False)
    assert llm.generate("Roses are red,", GREEDY, use_tqdm=False)[0].outputs[0].text == forms[0].outputs[0].text  # still alive


def test_progress_bar(llm, capsys, monkeypatch) -> None:
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    llm.generate(["Roses are red,"] * 3, SamplingParams(max_tokens=2), use_tqdm=True)
    assert "Processed prompts" in capsys.readouterr().err


def test_get_metrics_adds_up_to_the_outputs(llm) -> None:
    """`LLM.get_metrics()` offline: the token counters grow by what the outputs hold, and each
    finished request adds one success and one latency of each kind."""

    def figures() -> dict[tuple[str, str], object]:
        return {(m.name, m.labels.get("finished_reason", "")): m for m in llm.get_metrics()}

    before = figures()
    outputs = llm.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    after = figures()

    def grew(name: str, reason: str = "") -> float:
        key = ("shardlm:" + name, reason)
        old = before.get(key)
        return after[key].value - (old.value if old is not None else 0.0)

    assert grew("prompt_tokens") == sum(len(o.prompt_token_ids) for o in outputs)
    assert grew("generation_tokens") == sum(len(o.outputs[0].token_ids) for o in outputs) == 10
    assert grew("request_success", "length") == 2
    for name in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds"):
        key = ("shardlm:" + name, "")
        assert after[key].count - before[key].count == 2, name
    assert after[("shardlm:num_requests_running", "")].value == 0
