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


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text, one delta per token, exactly.

    Decoding a token alone is wrong in two ways: a multi-byte UTF-8 character may span several
    tokens (its first tokens decode to U+FFFD), and sentencepiece tokenizers drop or keep a
    leading space depending on what precedes. So each step decodes a short window of recent
    tokens twice, with and without the new ones, and emits the difference; text that still ends
    in an incomplete character is held back until the character is complete.
    """

    def __init__(self, tokenizer: Any, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = list(prompt_ids or [])
        self.prefix_offset = max(len(self.token_ids) - 5, 0)
        self.read_offset = len(self.token_ids)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def add(self, token_id: int) -> str:
        """Append one generated token; return the text it completes (possibly "")."""
        self.token_ids.append(token_id)
        prefix = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        self.text += delta
        return delta

    def finish(self) -> str:
        """At the end of the sequence: the text still held back (an incomplete character decodes to U+FFFD)."""
        prefix = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset :])
        delta = full[len(prefix) :] if len(full) > len(prefix) else ""
        self.prefix_offset = self.read_offset = len(self.token_ids)
        self.text += delta
        return delta


def warm_cache(model: str | None = None) -> None:
    """Load `model`'s tokenizer once (None: the embedded default), so that a GGUF file's
    conversion (seconds) is cached before the first engine start: `make setup` runs
    `python -m driver.tokenizer`."""
    from driver.args import EngineArgs

    load_tokenizer(EngineArgs(model=model).create_engine_config(device="cpu").model)


if __name__ == "__main__":
    import sys

    warm_cache(sys.argv[1] if len(sys.argv) > 1 else None)
