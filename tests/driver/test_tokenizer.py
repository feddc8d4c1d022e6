"""The tokenizer (from folders, the tokenizer argument and GGUF files) and the incremental detokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from driver import EngineArgs, IncrementalDetokenizer, load_tokenizer
from parallel.errors import ModelNotFound

TEXT = st.text(
    alphabet=st.sampled_from(list("abc xyz,.!\n") + list("éüñ") + list("中文字") + ["🎉", "🚀", "👍", "\U0001F3FD", "\u200d"]),
    max_size=30,
)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf):
    return load_tokenizer(EngineArgs(model=str(smollm2_gguf)).create_engine_config().model)


@pytest.fixture(scope="module")
def sentencepiece_tokenizer(tmp_path_factory):
    """A Llama-style sentencepiece tokenizer (metaspace, byte fallback), trained here."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("sp")
    corpus = ["Hello world, this is a test.", "café naïve résumé", "数字 and 中文", "emoji 🎉 rare"] * 50
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=340,
        byte_fallback=True, model_type="bpe", character_coverage=1.0, minloglevel=2,
    )
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    return AutoTokenizer.from_pretrained(folder)


def detokenize(tokenizer, prompt_ids: list[int], output_ids: list[int]) -> tuple[str, list[str]]:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    deltas = [detok.add(t) for t in output_ids]
    deltas.append(detok.finish())
    return "".join(deltas), deltas


def expected_text(tokenizer, prompt_ids: list[int], output_ids: list[int]) -> str:
    """What the output adds to the prompt when the whole sequence is decoded at once."""
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)  # noqa: E731
    whole, prompt = decode(prompt_ids + output_ids), decode(prompt_ids)
    assert whole.startswith(prompt)
    return whole[len(prompt) :]


def _check(tokenizer, prompt: str, output: str) -> None:
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    output_ids = tokenizer(output, add_special_tokens=False)["input_ids"]
    text, deltas = detokenize(tokenizer, prompt_ids, output_ids)
    assert text == expected_text(tokenizer, prompt_ids, output_ids)
    assert not any("\ufffd" in d for d in deltas[:-1]) or "\ufffd" in expected_text(tokenizer, prompt_ids, output_ids)


@SETTINGS
@given(prompt=TEXT, output=TEXT)
def test_incremental_equals_whole_byte_level_bpe(smollm2_tokenizer, prompt: str, output: str) -> None:
    _check(smollm2_tokenizer, prompt, output)


@SETTINGS
@given(prompt=TEXT, output=TEXT)
def test_incremental_equals_whole_sentencepiece(sentencepiece_tokenizer, prompt: str, output: str) -> None:
    _check(sentencepiece_tokenizer, prompt, output)


def test_multibyte_character_is_held_back_until_complete(sentencepiece_tokenizer) -> None:
    ids = sentencepiece_tokenizer("a 👍🏽 b", add_special_tokens=False)["input_ids"]
    pieces = sentencepiece_tokenizer.convert_ids_to_tokens(ids)
    assert sum(p.startswith("<0x") for p in pieces) >= 4, "the emoji must be spelled in byte tokens"
    text, deltas = detokenize(sentencepiece_tokenizer, [], ids)
    assert text == "a 👍🏽 b"
    assert "" in deltas, "some byte tokens complete no character by themselves"
    assert all("\ufffd" not in d for d in deltas)


def test_sentencepiece_leading_space_follows_the_prompt(sentencepiece_tokenizer) -> None:
    prompt = sentencepiece_tokenizer("Hello", add_special_tokens=False)["input_ids"]
    output = sentencepiece_tokenizer("Hello world", add_special_tokens=False)["input_ids"][1:]
    assert detokenize(sentencepiece_tokenizer, prompt, output)[0] == " world"
    assert detokenize(sentencepiece_tokenizer, [], output)[0] == "world"


def test_special_tokens_are_skipped(smollm2_tokenizer) -> None:
    ids = smollm2_tokenizer("Hi there", add_special_tokens=False)["input_ids"] + [smollm2_tokenizer.eos_token_id]
    assert detokenize(smollm2_tokenizer, [], ids)[0] == "Hi there"


def test_gguf_tokenizer_is_cached_and_identical(smollm2_gguf, shardlm_cache: Path) -> None:
    from transformers import AutoTokenizer

    fresh = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    model = EngineArgs(model=str(smollm2_gguf)).create_engine_config().model
    cached = load_tokenizer(model)
    assert any((shardlm_cache / "gguf-tokenizers").iterdir())
    for text in ["Hello world", "  héllo 你好 🎉\n\tx", "<|im_start|>user\nhi<|im_end|>"]:
        assert cached(text)["input_ids"] == fresh(text)["input_ids"]
    messages = [{"role": "user", "content": "What is 2+2?"}]
    rendered = cached.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == fresh.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nWhat is 2+2?<|im_end|>" in rendered
    assert (cached.eos_token_id, cached.bos_token_id) == (fresh.eos_token_id, fresh.bos_token_id)


def test_tokenizer_argument_and_missing_tokenizer(tiny_checkpoint, sentencepiece_tokenizer, tmp_path) -> None:
    folder, _ = tiny_checkpoint("llama")
    with pytest.raises(ModelNotFound, match="no tokenizer found at"):
        load_tokenizer(EngineArgs(model=str(folder), device="cpu").create_engine_config().model)
    sentencepiece_tokenizer.save_pretrained(tmp_path / "tok")
    model = EngineArgs(model=str(folder), tokenizer=str(tmp_path / "tok"), device="cpu").create_engine_config().model
    assert load_tokenizer(model)("Hello")["input_ids"] == sentencepiece_tokenizer("Hello")["input_ids"]
    assert os.path.isdir(model.tokenizer)
