"""The tokenizer and the incremental detokenizer (only `driver/` turns text into tokens and back)."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from parallel.errors import ConfigError, ModelNotFound
from workers.config import ModelConfig

logger = logging.getLogger(f"shardlm.{__name__}")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "*.tiktoken")


def cache_dir() -> Path:
    """shardlm's own cache: SHARDLM_CACHE_DIR, else $XDG_CACHE_HOME/shardlm, else ~/.cache/shardlm."""
    if os.environ.get("SHARDLM_CACHE_DIR"):
        return Path(os.environ["SHARDLM_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "shardlm"


def load_tokenizer(model: ModelConfig) -> Any:
    """The model's tokenizer: from its folder, the `tokenizer` argument, or the GGUF file itself."""
    import transformers
    from transformers import AutoTokenizer

    if model.tokenizer_mode == "slow" and int(transformers.__version__.split(".")[0]) >= 5:
        logger.warning("tokenizer_mode='slow' has no effect with transformers 5, which keeps only fast tokenizers")
    kwargs: dict[str, Any] = {
        "revision": model.tokenizer_revision,
        "trust_remote_code": model.trust_remote_code,
        "use_fast": model.tokenizer_mode != "slow",
    }
    if model.tokenizer == model.path and model.gguf_file:
        return _gguf_tokenizer(Path(model.path) / model.gguf_file, kwargs)
    folder = Path(model.tokenizer).expanduser()
    if folder.is_dir() and not any(any(folder.glob(pattern)) for pattern in TOKENIZER_FILES):
        raise ModelNotFound(
            f"no tokenizer found at {model.tokenizer!r}: the folder has none of {', '.join(TOKENIZER_FILES)}; "
            "pass tokenizer=<folder or repo id>"
        )
    try:
        return AutoTokenizer.from_pretrained(model.tokenizer, **kwargs)
    except Exception as exc:
        raise _tokenizer_error(model.tokenizer, model.tokenizer_mode, exc) from exc


def _tokenizer_error(where: str, mode: str, exc: Exception) -> Exception:
    if isinstance(exc, OSError):
        return ModelNotFound(f"no tokenizer found at {where!r}: {exc}; pass tokenizer=<folder or repo id>")
    return ConfigError(f"cannot load the tokenizer from {where!r} (tokenizer_mode={mode!r}): {exc}")


def _gguf_tokenizer(path: Path, kwargs: dict[str, Any]) -> Any:
    """The GGUF file's own tokenizer. Converting it takes seconds, so the result is kept in
    shardlm's cache, keyed by the file (path, size, mtime) and the transformers version."""
    import transformers
    from transformers import AutoTokenizer

    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{transformers.__version__}:{kwargs['use_fast']}"
    cached = cache_dir() / "gguf-tokenizers" / hashlib.sha256(key.encode()).hexdigest()[:24]
    if (cached / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(cached, use_fast=kwargs["use_fast"])
        except Exception as exc:  # a damaged cache entry: convert again
            logger.warning("ignoring the cached tokenizer in %s: %s", cached, exc)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
    except Exception as exc:
        raise _tokenizer_error(str(path), "auto" if kwargs["use_fast"] else "slow", exc) from exc
    _store(tokenizer, cached)
    return tokenizer


def _store(tokenizer: Any, destination: Path) -> None:
    """Save atomically (write beside, then rename); a cache that cannot be written is skipped."""
    staging: Path | None = None
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=destination.parent, prefix=".staging-"))
        tokenizer.save_pretrained(staging)
        os.replace(staging, destination)
    except OSError as exc:
        logger.info("not caching the GGUF tokenizer in %s: %s", destination, exc)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


PROMPT_WINDOW = 5  # prompt tokens decoded before the first output token, for its leading space


def decode_stream_backend(tokenizer: Any) -> Any | None:
    """The `tokenizers.Tokenizer` behind a fast tokenizer whose `decode` is that Tokenizer's own
    (so `tokenizers.decoders.DecodeStream` reproduces it), else None: slow tokenizers, and fast
    ones that override `decode` (Whisper, CodeGen and a few others post-process the text)."""
    try:
        from tokenizers import Tokenizer
        from tokenizers.decoders import DecodeStream  # noqa: F401  (tokenizers >= 0.21)
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        return None
    backend = getattr(tokenizer, "_tokenizer", None)
    if not (getattr(tokenizer, "is_fast", False) and isinstance(backend, Tokenizer)):
        return None
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        return None
    own = type(tokenizer)
    if own.decode is not PreTrainedTokenizerFast.decode or own._decode is not PreTrainedTokenizerFast._decode:
        return None
    return backend


def _invalid_prefix(exc: Exception) -> bool:
    return "Invalid prefix" in str(exc)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text, one delta per token, exactly as decoding the
    whole sequence would (`tokenizer.decode(ids, skip_special_tokens=...)`).

    Decoding a token alone is wrong in two ways: a multi-byte UTF-8 character may span several
    tokens (its first tokens decode to U+FFFD), and sentencepiece tokenizers drop or keep a
    leading space depending on what precedes. So each step decodes a window of recent tokens,
    `token_ids[prefix_offset:read_offset]` (text already emitted) and `token_ids[prefix_offset:]`,
    and emits the difference; text that still ends in an incomplete character is held back
    until the character is complete, and `finish` emits what is left (U+FFFD for incomplete bytes,
    as the whole decode has).

    For a fast tokenizer, `tokenizers.decoders.DecodeStream` runs that same algorithm in Rust, as
    vLLM V1's FastIncrementalDetokenizer does: one call per token instead of two Python `decode`
    calls. The offsets here follow the stream's window, so `finish` decodes the same window.
    Other tokenizers keep the windowed decode, and so does a request whose prompt ends inside a
    character (the stream would emit the prompt's bytes) or whose stream reports "Invalid prefix"
    (a decoder whose text is not monotonic, vLLM issue 17448), from then on.

    `spaces_between_special_tokens=False` (with special tokens kept) joins consecutive added
    tokens without a space. The windowed path passes it to a slow tokenizer's `decode` (only
    transformers 4's honour it); with a fast tokenizer, such a token's own text is emitted, as vLLM does.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: list[int] | None = None,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens or skip_special_tokens
        self.token_ids: list[int] = list(prompt_ids or [])
        self.prefix_offset = max(len(self.token_ids) - PROMPT_WINDOW, 0)
        self.read_offset = len(self.token_ids)
        self.text = ""
        self._backend = decode_stream_backend(tokenizer)
        self._stream: Any | None = None
        self._added_tokens: dict[int, str] = {}
        self._last_added = False
        if self._backend is not None:
            if not self.spaces_between_special_tokens:
                self._added_tokens = {i: t.content for i, t in self._backend.get_added_tokens_decoder().items()}
            self._start_stream()

    @property
    def uses_decode_stream(self) -> bool:
        return self._stream is not None

    def add(self, token_id: int) -> str:
        """Append one generated token; return the text it completes (possibly "")."""
        self.token_ids.append(token_id)
        delta = self._stream_step(token_id) if self._stream is not None else self._window_step()
        if self._added_tokens:
            delta = self._join_added_tokens(token_id, delta)
        self.text += delta
        return delta

    def finish(self) -> str:
        """At the end of the sequence: the text still held back (an incomplete character decodes to U+FFFD)."""
        prefix = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset :])
        delta = full[len(prefix) :] if len(full) > len(prefix) else ""
        self.prefix_offset = self.read_offset = len(self.token_ids)
        if self._stream is not None:
            self._stream = self._new_stream()
        self.text += delta
        return delta

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:  # what a fast tokenizer's decode does, without its Python layer
            return self._backend.decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=self.skip_special_tokens,
            clean_up_tokenization_spaces=False,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
        )

    def _window_step(self) -> str:
        prefix = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return full[len(prefix) :]

    def _stream_step(self, token_id: int) -> str:
        try:
            piece = self._stream.step(self._backend, token_id)
        except Exception as exc:
            if not _invalid_prefix(exc):
                raise
            logger.debug("DecodeStream: %s; decoding the rest of this sequence by windows", exc)
            self._stream = None
            return self._window_step()
        if piece is None:
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return piece

    def _new_stream(self) -> Any:
        from tokenizers.decoders import DecodeStream

        return DecodeStream(skip_special_tokens=self.skip_special_tokens)

    def _start_stream(self) -> None:
        """Feed the prompt's last tokens to a fresh stream (their text discarded), the offsets
        following its window, so that the first output token's leading space is right."""
        n = len(self.token_ids)
        stream, start = self._new_stream(), self._prompt_window_start()
        prefix_offset = read_offset = start
        try:
            for end in range(start, n):
                if stream.step(self._backend, self.token_ids[end]) is not None:
                    prefix_offset, read_offset = read_offset, end + 1
        except Exception as exc:
            if not _invalid_prefix(exc):
                raise
            return
        window = self.token_ids[prefix_offset:]
        if read_offset < n and self._decode(window) != self._decode(window[: read_offset - prefix_offset]):
            return  # the prompt ends inside a character: the stream would emit the prompt's bytes
        self._stream, self.prefix_offset, self.read_offset = stream, prefix_offset, read_offset

    def _prompt_window_start(self) -> int:
        """The last PROMPT_WINDOW prompt tokens, or more (up to 24, as vLLM) until they decode
        without U+FFFD, that is without starting inside a character: byte fallback decodes a whole
        run of byte tokens to U+FFFD when it starts inside one."""
        n = len(self.token_ids)
        for size in range(PROMPT_WINDOW, min(n, 24) + 1):
            if "\ufffd" not in self._decode(self.token_ids[n - size :]):
                return n - size
        return max(n - PROMPT_WINDOW, 0)

    def _join_added_tokens(self, token_id: int, delta: str) -> str:
        """An added token right after another: its own text, without the space a decoder may put before it."""
        content = self._added_tokens.get(token_id)
        if content is not None and self._last_added and delta:
            delta = content
        self._last_added = content is not None
        return delta


def warm_cache(model: str | None = None) -> None:
    """Load `model`'s tokenizer once (None: the embedded default), so that a GGUF file's
    conversion (seconds) is cached before the first engine start: `make setup` runs
    `python -m driver.engine.tokenizer`."""
    from driver.config.args import EngineArgs

    load_tokenizer(EngineArgs(model=model).create_engine_config(device="cpu").model)


if __name__ == "__main__":
    import sys

    warm_cache(sys.argv[1] if len(sys.argv) > 1 else None)
