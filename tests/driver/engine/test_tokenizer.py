"""The tokenizer (from folders, the tokenizer argument and GGUF files) and the incremental detokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from driver import EngineArgs, IncrementalDetokenizer, load_tokenizer
from driver.engine.tokenizer import decode_stream_backend
from parallel.errors import ModelNotFound

TEXT = st.text(
    alphabet=st.sampled_from(list("abc xyz,.!\n") + list("éüñ") + list("中文字") + ["🎉", "🚀", "👍", "\U0001f3fd", "\u200d"]),
    max_size=30,
)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf):
    return load_tokenizer(EngineArgs(model=str(smollm2_gguf)).create_engine_config(device="cpu").model)


@pytest.fixture(scope="module")
def sentencepiece_tokenizer(tmp_path_factory):
    """A Llama-style sentencepiece tokenizer (metaspace, byte fallback), trained here."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("sp")
    corpus = ["Hello world, this is a test.", "café naïve résumé", "数字 and 中文", "emoji 🎉 rare"] * 50
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=340,
        byte_fallback=True,
        model_type="bpe",
        character_coverage=1.0,
        minloglevel=2,
    )
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def byte_tokenizer():
    """One token per byte (as tests/helpers.py's with_byte_tokenizer), so that every character
    past ASCII spans several tokens; <|end|> and <|sep|> are special."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    byte_level = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_level.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=byte_level, eos_token="<|end|>", additional_special_tokens=["<|sep|>"])


class WindowedView:
    """The same tokenizer with its Rust backend hidden, as a slow tokenizer is: drives the windowed path."""

    is_fast = False

    def __init__(self, tokenizer) -> None:
        self.inner = tokenizer

    def decode(self, ids, **kwargs) -> str:
        return self.inner.decode(ids, **kwargs)


PATHS = ["stream", "windowed"]


def detokenizer(tokenizer, prompt_ids: list[int], path: str, **kwargs) -> IncrementalDetokenizer:
    detok = IncrementalDetokenizer(tokenizer if path == "stream" else WindowedView(tokenizer), prompt_ids, **kwargs)
    assert detok.uses_decode_stream == (path == "stream")
    return detok


def detokenize(tokenizer, prompt_ids: list[int], output_ids: list[int], path: str = "stream", **kwargs) -> tuple[str, list[str]]:
    detok = detokenizer(tokenizer, prompt_ids, path, **kwargs)
    deltas = [detok.add(t) for t in output_ids]
    deltas.append(detok.finish())
    assert detok.text == "".join(deltas)
    return "".join(deltas), deltas


def expected_text(tokenizer, prompt_ids: list[int], output_ids: list[int], skip_special_tokens: bool = True) -> str:
    """What the output adds to the prompt when the whole sequence is decoded at once."""

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)

    whole, prompt = decode(prompt_ids + output_ids), decode(prompt_ids)
    assert whole.startswith(prompt)
    return whole[len(prompt) :]


def _check(tokenizer, prompt: str, output: str, path: str) -> None:
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    output_ids = tokenizer(output, add_special_tokens=False)["input_ids"]
    text, deltas = detokenize(tokenizer, prompt_ids, output_ids, path)
    assert text == expected_text(tokenizer, prompt_ids, output_ids)
    assert not any("\ufffd" in d for d in deltas[:-1]) or "\ufffd" in expected_text(tokenizer, prompt_ids, output_ids)


@pytest.mark.parametrize("path", PATHS)
@SETTINGS
@given(prompt=TEXT, output=TEXT)
def test_incremental_equals_whole_byte_level_bpe(smollm2_tokenizer, path: str, prompt: str, output: str) -> None:
    _check(smollm2_tokenizer, prompt, output, path)


@pytest.mark.parametrize("path", PATHS)
@SETTINGS
@given(prompt=TEXT, output=TEXT)
def test_incremental_equals_whole_sentencepiece(sentencepiece_tokenizer, path: str, prompt: str, output: str) -> None:
    _check(sentencepiece_tokenizer, prompt, output, path)


@pytest.mark.parametrize("name", ["byte_tokenizer", "smollm2_tokenizer"])
@pytest.mark.parametrize("path", PATHS)
@SETTINGS
@given(prompt=TEXT, skip_special_tokens=st.booleans(), data=st.data())
def test_incremental_equals_whole_random_tokens(
    request, name: str, path: str, prompt: str, skip_special_tokens: bool, data: st.DataObject
) -> None:
    """Any token sequence, invalid UTF-8 and special tokens included, even one ending inside a character."""
    tokenizer = request.getfixturevalue(name)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    output_ids = data.draw(st.lists(st.integers(0, len(tokenizer) - 1), max_size=40))
    text, _ = detokenize(tokenizer, prompt_ids, output_ids, path, skip_special_tokens=skip_special_tokens)
    assert text == expected_text(tokenizer, prompt_ids, output_ids, skip_special_tokens)


@pytest.mark.parametrize("path", PATHS)
def test_characters_spanning_tokens_are_held_back(byte_tokenizer, path: str) -> None:
    ids = byte_tokenizer("a 🎉中", add_special_tokens=False)["input_ids"]
    assert len(ids) == 2 + 4 + 3
    assert detokenize(byte_tokenizer, [], ids, path)[1] == ["a", " ", "", "", "", "🎉", "", "", "中", ""]


@pytest.mark.parametrize("path", PATHS)
def test_incomplete_character_at_the_end_is_emitted_by_finish(byte_tokenizer, path: str) -> None:
    ids = byte_tokenizer("x🎉", add_special_tokens=False)["input_ids"][:-1]
    text, deltas = detokenize(byte_tokenizer, [], ids, path)
    assert deltas == ["x", "", "", "", "\ufffd"] and text == byte_tokenizer.decode(ids) == "x\ufffd"


def test_prompt_ending_inside_a_character_keeps_the_windowed_decode(byte_tokenizer) -> None:
    ids = byte_tokenizer("a🎉b", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(byte_tokenizer, ids[:3])
    assert not detok.uses_decode_stream
    windowed = IncrementalDetokenizer(WindowedView(byte_tokenizer), ids[:3])
    assert [detok.add(t) for t in ids[3:]] == [windowed.add(t) for t in ids[3:]]


@pytest.mark.parametrize("path", PATHS)
def test_multibyte_character_is_held_back_until_complete(sentencepiece_tokenizer, path: str) -> None:
    ids = sentencepiece_tokenizer("a 👍🏽 b", add_special_tokens=False)["input_ids"]
    pieces = sentencepiece_tokenizer.convert_ids_to_tokens(ids)
    assert sum(p.startswith("<0x") for p in pieces) >= 4, "the emoji must be spelled in byte tokens"
    text, deltas = detokenize(sentencepiece_tokenizer, [], ids, path)
    assert text == "a 👍🏽 b"
    assert "" in deltas, "some byte tokens complete no character by themselves"
    assert all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize("path", PATHS)
def test_sentencepiece_leading_space_follows_the_prompt(sentencepiece_tokenizer, path: str) -> None:
    prompt = sentencepiece_tokenizer("Hello", add_special_tokens=False)["input_ids"]
    output = sentencepiece_tokenizer("Hello world", add_special_tokens=False)["input_ids"][1:]
    assert detokenize(sentencepiece_tokenizer, prompt, output, path)[0] == " world"
    assert detokenize(sentencepiece_tokenizer, [], output, path)[0] == "world"


def test_sentencepiece_prompt_ending_in_byte_tokens(sentencepiece_tokenizer) -> None:
    """Byte fallback decodes a run of byte tokens that starts inside a character to U+FFFD only:
    the stream starts from a longer prompt window that decodes cleanly."""
    prompt = sentencepiece_tokenizer("ñ🏽", add_special_tokens=False)["input_ids"]
    assert "\ufffd" in sentencepiece_tokenizer.decode(prompt[-5:])
    output = sentencepiece_tokenizer(" ok", add_special_tokens=False)["input_ids"]
    text, _ = detokenize(sentencepiece_tokenizer, prompt, output)
    assert text == expected_text(sentencepiece_tokenizer, prompt, output)


@pytest.mark.parametrize("path", PATHS)
def test_smollm2_leading_space_follows_the_prompt(smollm2_tokenizer, path: str) -> None:
    prompt = smollm2_tokenizer("Hello", add_special_tokens=False)["input_ids"]
    output = smollm2_tokenizer(" world 🎉", add_special_tokens=False)["input_ids"]
    assert detokenize(smollm2_tokenizer, prompt, output, path)[0] == " world 🎉"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_special_tokens_skipped_or_kept(smollm2_tokenizer, path: str, skip_special_tokens: bool) -> None:
    prompt = smollm2_tokenizer("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    output = smollm2_tokenizer("Hi there 你好<|im_end|><|im_start|>", add_special_tokens=False)["input_ids"]
    output.append(smollm2_tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    text, _ = detokenize(smollm2_tokenizer, prompt, output, path, skip_special_tokens=skip_special_tokens)
    assert text == ("Hi there 你好" if skip_special_tokens else "Hi there 你好<|im_end|><|im_start|><|endoftext|>")
    assert text == expected_text(smollm2_tokenizer, prompt, output, skip_special_tokens)
    kept_apart, _ = detokenize(
        smollm2_tokenizer,
        prompt,
        output,
        path,
        skip_special_tokens=skip_special_tokens,
        spaces_between_special_tokens=False,
    )
    assert kept_apart == text, "a byte-level decoder puts no space between special tokens anyway"


def test_spaces_between_special_tokens_as_vllm() -> None:
    """A WordPiece decoder joins tokens with spaces; spaces_between_special_tokens=False drops the
    space between consecutive added tokens only (vLLM's FastIncrementalDetokenizer does the same)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "hello": 3, "world": 4, "##s": 5}
    wordpiece = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    wordpiece.pre_tokenizer, wordpiece.decoder = pre_tokenizers.BertPreTokenizer(), decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=wordpiece, cls_token="[CLS]", sep_token="[SEP]", unk_token="[UNK]")
    output = [1, 4, 5, 2, 2, 3]
    assert expected_text(tokenizer, [3], output, False) == " [CLS] worlds [SEP] [SEP] hello"
    assert detokenize(tokenizer, [3], output, skip_special_tokens=False)[0] == " [CLS] worlds [SEP] [SEP] hello"
    assert detokenize(tokenizer, [3], output, skip_special_tokens=False, spaces_between_special_tokens=False)[0] == (
        " [CLS] worlds [SEP][SEP] hello"
    )
    assert detokenize(tokenizer, [3], output, spaces_between_special_tokens=False)[0] == " worlds hello"


def test_invalid_prefix_falls_back_to_the_windowed_decode() -> None:
    """A decoder whose text is not monotonic ("a", then "ab" -> "X") makes DecodeStream raise
    "Invalid prefix"; the sequence goes on by windows, as the windowed path decodes it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel(vocab={"a": 0, "b": 1, "c": 2, "[UNK]": 3}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.decoder = decoders.Sequence([decoders.Fuse(), decoders.Replace("ab", "X")])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words)
    stream, windowed = IncrementalDetokenizer(tokenizer), IncrementalDetokenizer(WindowedView(tokenizer))
    assert stream.uses_decode_stream
    ids = [0, 1, 2, 0, 1]
    assert [stream.add(t) for t in ids] == [windowed.add(t) for t in ids]
    assert not stream.uses_decode_stream
    assert stream.finish() == windowed.finish()


def test_decode_stream_only_for_plain_fast_tokenizers(smollm2_tokenizer, sentencepiece_tokenizer) -> None:
    from transformers import PreTrainedTokenizerFast

    assert smollm2_tokenizer.is_fast, "the GGUF file's converted tokenizer is a fast one"
    assert decode_stream_backend(smollm2_tokenizer) is smollm2_tokenizer._tokenizer
    assert decode_stream_backend(sentencepiece_tokenizer) is sentencepiece_tokenizer._tokenizer
    assert decode_stream_backend(WindowedView(smollm2_tokenizer)) is None

    class PostProcessed(PreTrainedTokenizerFast):
        def decode(self, *args, **kwargs):
            return super().decode(*args, **kwargs).upper()

    assert decode_stream_backend(PostProcessed(tokenizer_object=smollm2_tokenizer._tokenizer)) is None


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
