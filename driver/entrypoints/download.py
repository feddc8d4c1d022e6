"""`shardlm download MODEL`: fetch exactly what a start of MODEL would (config, tokenizer,
generation config, one weight format) into a Hugging Face cache, for clusters whose nodes
cannot reach the Hub themselves. A later start, offline (HF_HUB_OFFLINE=1) or with the Hub
down, finds it there."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from parallel.errors import ConfigError
from workers.model_files import LOAD_FORMATS as START_FORMATS

if TYPE_CHECKING:
    from workers.model_files import ModelFiles

LOAD_FORMATS = tuple(f for f in START_FORMATS if f != "gguf")
"""What a download can fetch: a repo's GGUF files are not what a start of a repo id reads."""


def download(model: str, revision: str | None = None, download_dir: str | None = None, load_format: str = "auto") -> ModelFiles:
    """Fetch `model` (a Hub repo id) at `revision` as a start would; where it landed."""
    from workers.model_files import find_model

    if load_format not in LOAD_FORMATS:
        raise ConfigError(f"--load-format {load_format} is not one of {', '.join(LOAD_FORMATS)} for a download")
    if Path(model).expanduser().exists():
        raise ConfigError(f"{model!r} is a local path; `shardlm download` fetches Hugging Face repo ids, e.g. org/name")
    return find_model(model, revision, download_dir, load_format)


def add_download_parser(sub: argparse._SubParsersAction, epilog: str, formatter: type) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "download",
        help="fetch what a start of MODEL needs (config, tokenizer, one weight format) into the Hugging Face cache",
        description=__doc__,
        epilog=epilog,
        formatter_class=formatter,
    )
    parser.add_argument("model", metavar="MODEL", help="a Hugging Face repo id, e.g. HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--revision", default=None, help="a branch, tag or commit (default: main)")
    parser.add_argument(
        "--download-dir", default=None, help="the Hugging Face cache folder (default: huggingface_hub's, HF_HUB_CACHE)"
    )
    parser.add_argument(
        "--load-format",
        default="auto",
        choices=LOAD_FORMATS,
        help="which weights: auto (safetensors where the repo has them, else .bin/.pt), safetensors, pt, sharded_state, "
        "or dummy (config and tokenizer only)",
    )
    return parser


def cmd_download(ns: argparse.Namespace) -> int:
    files = download(ns.model, ns.revision, ns.download_dir, ns.load_format)
    weights = f"{len(files.weight_files)} {files.weight_format} file(s)" if files.weight_files else "no weights"
    print(f"{ns.model} at commit {files.commit}: {weights}, in {files.folder}")
    return 0
