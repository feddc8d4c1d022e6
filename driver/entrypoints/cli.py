"""The `shardlm` command (also `python -m driver`)."""

from __future__ import annotations

import argparse
import ast
import atexit
import contextlib
import difflib
import functools
import gc
import importlib.util
import inspect
import json
import logging
import os
import re
import stat
import sys
import textwrap
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from cluster.logs import log_to_stderr
from driver.config.units import parse_size
from parallel.errors import ConfigError, EngineDeadError, ShardLMError

if TYPE_CHECKING:
    from driver.config.args import EngineArgs
    from driver.entrypoints.llm import LLM
    from workers.sampling_params import SamplingParams

SHORT_FLAGS = {"tensor_parallel_size": "-tp"}
DEFAULT_PROMPT = "The capital of France is"
EXIT_COMMANDS = ("/exit", "/quit")
SAMPLING_FLAGS = ("max_tokens", "temperature", "top_p", "top_k")
CHAT_MAX_TOKENS = 256

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_DOES_NOT_FIT, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 3, 130, 143
EXIT_STATUS = f"""\
exit status: {EXIT_OK} done; {EXIT_BAD_INPUT} bad input (a flag, a model that cannot be found or read, a
config the engine refuses), with one line `shardlm: error: ...` on stderr (--debug adds the
traceback); {EXIT_FAILED} the engine failed while running; {EXIT_INTERRUPTED} interrupted (Ctrl-C); {EXIT_TERMINATED} ended by SIGTERM."""
PLAN_EPILOG = f"""\
The model may be a folder holding only config.json, a Hugging Face repo id (only its config
files are fetched, or read from the cache offline) or a .gguf file (its metadata): no weights
are read. 4-bit GPTQ and AWQ checkpoints are planned from their quantization_config.

example:
  shardlm plan --model meta-llama/Llama-3.1-70B-Instruct -tp 4 --gpu-memory 80GiB

sizes: 80GiB (80 x 2**30 bytes), 80GB (80 x 10**9), 81920MiB; a bare number is refused.

exit status: {EXIT_OK} it fits; {EXIT_BAD_INPUT} bad input (a flag, a model that cannot be read, a -tp
that does not split the model, e.g. -tp 3 on 64 heads), one line on stderr; {EXIT_DOES_NOT_FIT} it does not
fit: the plan says by how much per rank and what would fit (the largest --max-model-len, the
smallest -tp, --kv-cache-dtype fp8 or --quantization fp8). --json prints one JSON object on
stdout whatever the outcome, with "fits", "shortfall_bytes_per_rank" and "suggestions"."""
SAMPLING_EPILOG = """\
sampling: the flags not given take the model's own defaults from its generation_config.json
(temperature, top_p, top_k, repetition_penalty, and max_new_tokens as --max-tokens) where it
has one; --generation-config vllm ignores that file, for shardlm's defaults: temperature 1.0,
top_p 1.0, top_k 0 (all tokens), {max_tokens} new tokens. --temperature 0 samples greedily."""


class ShardLMParser(argparse.ArgumentParser):
    """argparse, with its errors on one line (`shardlm: error: ...`, exit 2) and the nearest
    flag suggested for an unknown one."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):
            message += near_flags(message.split(":", 1)[1].split())
        self.exit(EXIT_BAD_INPUT, f"shardlm: error: {message} (see `{self.prog} --help`)\n")


def near_flags(words: list[str]) -> str:
    known = sorted({opt for p in all_parsers(build_parser()) for a in p._actions for opt in a.option_strings})
    for word in words:
        if word.startswith("-") and (near := difflib.get_close_matches(word.split("=")[0], known, n=1)):
            return f"; did you mean {near[0]}?"
    return ""


def all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """`parser` and every subcommand's parser under it."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [parser, *(q for a in subs for p in dict.fromkeys(a.choices.values()) for q in all_parsers(p))]


def memory_size(text: str) -> int:
    """A size with its unit: 80GiB, 80GB, 81920MiB (a bare number is refused)."""
    try:
        return parse_size(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def byte_count(text: str) -> int:
    """Bytes, or a size with its unit."""
    try:
        return parse_size(text, bare="bytes", what="a number of bytes")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def capability(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)(?:\.(\d+))?\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"cannot read {text!r} as a compute capability: write MAJOR.MINOR, e.g. 9.0 (H100) or 8.0 (A100)"
        )
    return int(match.group(1)), int(match.group(2) or 0)


class PromptsError(ShardLMError, ValueError):
    """A prompts file, or stdin, that gives no prompts."""


@dataclass(frozen=True)
class EngineField:
    """A field of `EngineArgs` as its source declares it."""

    name: str
    type: str
    default: Any
    doc: str


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source."""
    return _docs(ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body)


def _docs(body: list[ast.stmt]) -> dict[str, str]:
    docs: dict[str, str] = {}
    for stmt, after in zip(body, body[1:]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[stmt.target.id] = " ".join(str(after.value.value).split())
    return docs


@functools.cache
def engine_fields() -> tuple[EngineField, ...]:
    """`EngineArgs`' fields, read from driver/config/args.py without importing it: the flags are known
    before torch is imported, so that an engine start can import it beside Ray's start."""
    source = Path(importlib.util.find_spec("driver.config.args").origin).read_text(encoding="utf-8")
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "EngineArgs")
    docs = _docs(node.body)
    return tuple(
        EngineField(
            stmt.target.id,
            ast.unparse(stmt.annotation),
            None if stmt.value is None else ast.literal_eval(stmt.value),
            docs.get(stmt.target.id, ""),
        )
        for stmt in node.body
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
    )


FLAG_TYPES = {"kv_cache_memory_bytes": (byte_count, "bytes, or a size such as 16GiB")}
"""Engine flags read otherwise than their annotation says, and what the flag's help adds."""


def _flag_type(name: str, annotation: str) -> Any:
    base = annotation.replace(" | None", "").strip()
    return FLAG_TYPES[name][0] if name in FLAG_TYPES else {"int": int, "float": float}.get(base, str)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per `EngineArgs` field, in vLLM's spelling (--tensor-parallel-size, -tp, ...)."""
    group = parser.add_argument_group("engine")
    for f in engine_fields():
        flags = [f"--{f.name.replace('_', '-')}"] + ([SHORT_FLAGS[f.name]] if f.name in SHORT_FLAGS else [])
        note = f" ({FLAG_TYPES[f.name][1]})" if f.name in FLAG_TYPES else ""
        help_text = f.doc + note + (f" (default: {f.default})" if f.default is not None else "")
        if f.type == "bool" and f.default is True:  # on by default: --no-flag turns it off, as vLLM's
            group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=True, help=help_text)
        elif f.type == "bool":
            group.add_argument(*flags, dest=f.name, action="store_true", default=f.default, help=help_text)
        elif f.type == "bool | None":  # --flag / --no-flag, unset: the engine decides
            group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(*flags, dest=f.name, type=_flag_type(f.name, f.type), default=f.default, help=help_text)


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    from driver.config.args import EngineArgs

    return EngineArgs(**changed_engine_args(ns))


def changed_engine_args(ns: argparse.Namespace) -> dict[str, Any]:
    """The engine flags that differ from their defaults, as keyword arguments of `LLM` (which
    validates them)."""
    return {f.name: getattr(ns, f.name) for f in engine_fields() if getattr(ns, f.name) != f.default}


def add_sampling_args(parser: argparse.ArgumentParser, max_tokens: str) -> None:
    """The sampling flags, None unless typed: what is not typed takes the model's defaults."""
    model = "the model's generation_config.json where it sets it, else"
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=None, help=f"the most new tokens per reply (default: {max_tokens})")
    group.add_argument("--temperature", type=float, default=None, help=f"0 samples greedily (default: {model} 1.0)")
    group.add_argument(
        "--top-p",
        type=float,
        default=None,
        help=f"sample from the smallest set of likeliest tokens whose probability reaches this, in (0, 1] (default: {model} 1.0)",
    )
    group.add_argument(
        "--top-k", type=int, default=None, help=f"sample from the k likeliest tokens; 0 or -1: all (default: {model} 0)"
    )


def add_common_flags(parser: argparse.ArgumentParser, top: bool = False) -> None:
    """--quiet and --debug, accepted before the command and after it (`shardlm generate --quiet`)."""
    default = False if top else argparse.SUPPRESS  # a subcommand must not reset what was given before it
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default,
        help="no progress bars or info logs: results, warnings and errors only",
    )
    parser.add_argument("--debug", action="store_true", default=default, help="debug logs, and the traceback of an error")


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = ShardLMParser(
        prog="shardlm", description="Tensor-parallel LLM inference on Ray.", epilog=EXIT_STATUS, formatter_class=raw
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser(
        "generate",
        help="start an engine and complete prompts",
        description="Start an engine and complete prompts.",
        epilog=SAMPLING_EPILOG.format(max_tokens=16) + "\n\n" + EXIT_STATUS,
        formatter_class=raw,
    )
    gen.add_argument(
        "prompts",
        nargs="*",
        help=f"prompts; '-' reads stdin, one prompt a line. With no prompts and no --prompts-file: stdin when it is "
        f"a pipe or a file, else {DEFAULT_PROMPT!r}",
    )
    gen.add_argument(
        "--prompts-file", default=None, help='one prompt a line; in a .jsonl file, {"prompt": ...} or a JSON string a line'
    )
    add_sampling_args(gen, max_tokens="the model's max_new_tokens, else 16")
    gen.add_argument("--json", action="store_true", help="print machine-readable JSON")
    add_engine_args(gen)

    chat = sub.add_parser(
        "chat",
        help="talk with the model through its chat template, a reply streamed as it is generated",
        description="Talk with the model through its chat template, a reply streamed as it is generated.",
        epilog=SAMPLING_EPILOG.format(max_tokens=CHAT_MAX_TOKENS) + "\n\n" + EXIT_STATUS,
        formatter_class=raw,
    )
    chat.add_argument(
        "--message", default=None, help="answer this one message and exit (default: read a message a line until /exit or EOF)"
    )
    chat.add_argument("--system", default=None, help="a system prompt at the start of the conversation")
    add_sampling_args(chat, max_tokens=f"the model's max_new_tokens, else {CHAT_MAX_TOKENS}")
    add_engine_args(chat)

    srv = sub.add_parser(
        "serve",
        help="serve OpenAI's completions and chat completions API (Ray Serve) until Ctrl-C",
        epilog=EXIT_STATUS,
        formatter_class=raw,
    )
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    srv.add_argument(
        "--served-model-name",
        default=None,
        help="the name clients give as `model` (default: --model as given, or the default model's name)",
    )
    srv.add_argument("--num-replicas", type=int, default=1, help="engines serving it, each with its own ranks (default: 1)")
    srv.add_argument(
        "--api-key",
        default=None,
        help="requests to /v1 must carry `Authorization: Bearer KEY` (default: SHARDLM_API_KEY, else no key)",
    )
    srv.add_argument(
        "--max-ongoing-requests",
        type=int,
        default=None,
        help="requests each replica holds at once; more queue (default: --max-num-seqs)",
    )
    srv.add_argument(
        "--max-queued-requests",
        type=int,
        default=-1,
        help="requests queued beyond those; a full queue answers 503 with Retry-After (default: -1, no limit)",
    )
    srv.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds requests in flight may take to finish after SIGTERM or Ctrl-C (default: 30)",
    )
    add_engine_args(srv)

    plan = sub.add_parser(
        "plan",
        help="does it fit? weights and KV capacity per rank, from the model's config alone: no weights, no GPU",
        description="Does it fit? Weights, KV bytes per token and KV capacity per rank, from the model's config alone.",
        epilog=PLAN_EPILOG,
        formatter_class=raw,
    )
    plan.add_argument(
        "--gpu-memory",
        type=memory_size,
        default=None,
        help="memory of each GPU, with its unit: 80GiB, 80GB, 81920MiB (or give --kv-cache-memory-bytes)",
    )
    plan.add_argument(
        "--gpu-capability", type=capability, default=(9, 0), help="compute capability, for --dtype auto and fp8 (default: 9.0)"
    )
    plan.add_argument("--json", action="store_true", help="print the plan as one JSON object on stdout")
    add_engine_args(plan)

    save = sub.add_parser(
        "save-sharded",
        help="write each rank's final tensors (sharded_state) for fast later starts",
        epilog=EXIT_STATUS,
        formatter_class=raw,
    )
    save.add_argument("output", help="the folder to write: model-rank-R-part-P.safetensors, config, tokenizer, manifest")
    save.add_argument("--max-size", type=byte_count, default=None, help="the most bytes per file, e.g. 2GiB (default: 5GiB)")
    add_engine_args(save)

    bench = sub.add_parser("bench", help="measure shardlm beside transformers", epilog=EXIT_STATUS, formatter_class=raw)
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    load = bench_sub.add_parser("load", help="load time and peak memory against from_pretrained")
    load.add_argument("--model", required=True, help="a checkpoint folder or .gguf file")
    load.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="the dtype both load in (default: float32)"
    )
    load.add_argument("--repeat", type=int, default=1, help="runs of each; the best is shown")
    load.add_argument("-tp", "--tensor-parallel-size", type=int, default=1, help="ranks, each loading in its own process")
    load.add_argument(
        "--safetensors-load-strategy",
        default="auto",
        choices=["auto", "page_cache", "direct"],
        help="how shardlm's ranks read the files, as for the engine (default: auto)",
    )
    load.add_argument("--engine", action="store_true", help="also time one whole LLM(...) start, phase by phase")
    load.add_argument("--json", action="store_true", help="print machine-readable JSON")

    start = bench_sub.add_parser("start", help="a whole LLM(...) start, phase by phase, over fresh processes")
    start.add_argument("--repeat", type=int, default=3, help="fresh processes, one after another (default: 3)")
    start.add_argument("--json", action="store_true", help="print machine-readable JSON: every run's seconds")
    add_engine_args(start)

    prefix = bench_sub.add_parser("prefix", help="one long prompt twice, prefix caching on and off: the second request's time")
    prefix.add_argument("--prompt-len", type=int, default=2000, help="prompt tokens (random ids; default: 2000)")
    prefix.add_argument("--output-len", type=int, default=8, help="new tokens per request (default: 8)")
    prefix.add_argument("--bench-seed", type=int, default=0, help="seed of the random prompt")
    prefix.add_argument("--json", action="store_true", help="print machine-readable JSON")
    add_engine_args(prefix)

    tput = bench_sub.add_parser("throughput", help="offline generation against transformers' batched generate")
    tput.add_argument("--num-prompts", type=int, default=64, help="random prompts, all submitted at once (default: 64)")
    tput.add_argument("--input-len", type=int, default=32, help="prompt length (the shortest, with --input-len-max)")
    tput.add_argument("--input-len-max", type=int, default=None, help="draw prompt lengths from [input-len, this]")
    tput.add_argument(
        "--output-len", type=int, default=64, help="new tokens per prompt (the most, with --output-len-min; default: 64)"
    )
    tput.add_argument(
        "--output-len-min", type=int, default=None, help="draw each request's output length from [this, output-len]"
    )
    tput.add_argument(
        "--mixed",
        action="store_true",
        help="a mixed workload: prompt and output lengths drawn per request (--input-len-max default: 4 x input-len, "
        "--output-len-min default: output-len / 8); transformers runs one padded batch to the longest output, "
        "and only the requested tokens count",
    )
    tput.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds, the libraries taking turns, fresh prompts each; the best is shown (default: 1)",
    )
    tput.add_argument("--bench-seed", type=int, default=0, help="seed of the random prompts")
    tput.add_argument("--json", action="store_true", help="print machine-readable JSON")
    add_engine_args(tput)

    from driver.entrypoints.bench.latency import batch_sizes

    lat = bench_sub.add_parser("latency", help="ms per decode step at given batch sizes against transformers' generate loop")
    lat.add_argument("--batch-sizes", type=batch_sizes, default=[1, 8, 64], help="comma-separated batch sizes (default: 1,8,64)")
    lat.add_argument("--input-len", type=int, default=16, help="prompt tokens (random ids; default: 16)")
    lat.add_argument("--output-len", type=int, default=128, help="new tokens per request, at least 2 (default: 128)")
    lat.add_argument("--repeat", type=int, default=3, help="runs of each timing; the best is shown (default: 3)")
    lat.add_argument("--bench-seed", type=int, default=0, help="seed of the random prompts")
    lat.add_argument(
        "--tiny",
        action="store_true",
        help="issue 11's tiny Llama (hidden 64, 2 layers, dummy weights) written to a temporary folder: the step's "
        "overhead alone (instead of --model)",
    )
    lat.add_argument("--json", action="store_true", help="print machine-readable JSON")
    add_engine_args(lat)

    srv_bench = bench_sub.add_parser(
        "serve", help="a serving benchmark through the OpenAI API: throughput, TTFT, TPOT and E2E latency (as vllm bench serve)"
    )
    srv_bench.add_argument("--url", default=None, help="a running server (http://host:port[/v1]); default: start one here")
    srv_bench.add_argument(
        "--endpoint", default="completions", choices=["completions", "chat"], help="the route to send to (default: completions)"
    )
    srv_bench.add_argument(
        "--model-name", default=None, help="the model name the requests carry (default: the first of /v1/models)"
    )
    srv_bench.add_argument("--num-prompts", type=int, default=64, help="requests to send (default: 64)")
    srv_bench.add_argument("--input-len", type=int, default=32, help="prompt tokens (random ids; words for chat; default: 32)")
    srv_bench.add_argument("--output-len", type=int, default=64, help="new tokens per request (default: 64)")
    srv_bench.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="requests per second, Poisson arrivals (default: inf, all at once)",
    )
    srv_bench.add_argument("--max-concurrency", type=int, default=None, help="the most requests in flight (default: no bound)")
    srv_bench.add_argument("--prompt", default=None, help="one prompt text for every request instead of random ones")
    srv_bench.add_argument("--bench-seed", type=int, default=0, help="seed of the random prompts and arrival gaps")
    srv_bench.add_argument("--api-key", default=None, help="sent as `Authorization: Bearer KEY` (default: SHARDLM_API_KEY)")
    srv_bench.add_argument("--timeout-s", type=float, default=600.0, help="seconds one request may take (default: 600)")
    srv_bench.add_argument(
        "--port", type=int, default=8000, help="the port of the server started here, without --url (default: 8000)"
    )
    srv_bench.add_argument("--json", action="store_true", help="print machine-readable JSON")
    add_engine_args(srv_bench)

    from driver.entrypoints.download import add_download_parser

    add_download_parser(sub, EXIT_STATUS, raw)
    for command in [parser, *sub.choices.values(), *bench_sub.choices.values()]:
        add_common_flags(command, top=command is parser)
    return parser


def open_llm(ns: argparse.Namespace) -> LLM:
    """The engine a command asked for, with progress bars unless --quiet."""
    from driver.entrypoints.llm import LLM

    return LLM(**changed_engine_args(ns), show_progress=not ns.quiet)


def typed_sampling(ns: argparse.Namespace) -> dict[str, Any]:
    """The sampling flags typed on the command line, checked before any engine starts
    (`SamplingParams`' own message, about the flag)."""
    from workers.sampling_params import SamplingParams

    typed = {name: getattr(ns, name) for name in SAMPLING_FLAGS if getattr(ns, name) is not None}
    try:
        SamplingParams(**typed)
    except ValueError as exc:
        raise ConfigError(str(exc), field=str(exc).split()[0]) from None
    return typed


def sampling_params_from(llm: LLM, typed: dict[str, Any], fallback: dict[str, Any] | None = None) -> SamplingParams | None:
    """What to pass to `llm.generate`: None when no sampling flag was typed and the command has
    no defaults of its own, so that the engine applies its defaults; else the typed flags over
    the model's defaults (`llm.generation_defaults`: its generation_config.json, unless
    --generation-config vllm) over the command's `fallback` (chat's longer max_tokens)."""
    from workers.sampling_params import SamplingParams

    if not typed and not fallback:
        return None
    model = getattr(getattr(llm, "generation_defaults", None), "values", None) or {}
    return SamplingParams(**{**(fallback or {}), **model, **typed})


def cmd_generate(ns: argparse.Namespace) -> int:
    typed = typed_sampling(ns)
    prompts = read_prompts(ns)
    with open_llm(ns) as llm:
        outputs = llm.generate(prompts, sampling_params_from(llm, typed), use_tqdm=not ns.quiet)
        report = llm.load_report
    if ns.json:
        texts = [
            {
                "prompt": p,
                "text": o.outputs[0].text,
                "token_ids": o.outputs[0].token_ids,
                "finish_reason": o.outputs[0].finish_reason,
            }
            for p, o in zip(prompts, outputs)
        ]
        print(json.dumps({"load_report": json.loads(report.to_json()), "outputs": texts}))
        return 0
    if not ns.quiet:
        print(report.format() + "\n")
    for prompt, out in zip(prompts, outputs):
        print(f"{prompt!r} -> {out.outputs[0].text!r}")
    return 0


# -- where generate's prompts come from ---------------------------------------------------------


def read_prompts(ns: argparse.Namespace) -> list[str]:
    """The prompt arguments ('-' reads stdin), then those of --prompts-file; with neither, stdin
    when it is a pipe or a file; else the default prompt."""
    prompts: list[str] = []
    for arg in ns.prompts:
        prompts += stdin_prompts(required=True) if arg == "-" else [arg]
    if ns.prompts_file is not None:
        prompts += file_prompts(Path(ns.prompts_file))
    if not ns.prompts and ns.prompts_file is None and stdin_is_piped():
        prompts = stdin_prompts(required=False)
    return prompts or [DEFAULT_PROMPT]


def file_prompts(path: Path) -> list[str]:
    """One prompt a non-blank line; in a .jsonl file each line is {"prompt": ...} or a JSON string."""
    hint = 'give a text file with one prompt a line, or a .jsonl file with a {"prompt": "..."} object a line'
    if not path.is_file():
        raise PromptsError(f"prompts file {str(path)!r} {'is a folder' if path.is_dir() else 'does not exist'}; {hint}")
    text = path.read_text(encoding="utf-8")
    prompts = jsonl_prompts(text, str(path)) if path.suffix == ".jsonl" else text_lines(text)
    if not prompts:
        raise PromptsError(f"prompts file {str(path)!r} holds no prompt; {hint}")
    return prompts


def jsonl_prompts(text: str, where: str) -> list[str]:
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptsError(f'{where}, line {number}: not JSON ({exc.msg}); write {{"prompt": "..."}} on each line') from None
        if isinstance(value, dict):
            value = value.get("prompt")
        if not isinstance(value, str):
            raise PromptsError(f'{where}, line {number}: no "prompt" string; write {{"prompt": "..."}} on each line')
        prompts.append(value)
    return prompts


def text_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def stdin_prompts(required: bool) -> list[str]:
    """Stdin's non-blank lines; with `required`, none is an error."""
    try:
        prompts = text_lines(sys.stdin.read()) if sys.stdin is not None else []
    except (OSError, ValueError):  # closed, or captured (pytest)
        prompts = []
    if required and not prompts:
        raise PromptsError(
            "'-' reads prompts from stdin, one a line, but stdin gave none; e.g. echo 'Hello' | shardlm generate -"
        )
    return prompts


def stdin_is_piped() -> bool:
    """Whether stdin is a pipe or a regular file (not a terminal, /dev/null, or a socket)."""
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (AttributeError, OSError, ValueError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode)


def stdin_is_terminal() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


# -- chat ---------------------------------------------------------------------------------------


def cmd_chat(ns: argparse.Namespace) -> int:
    """One reply to --message, or a conversation: a message a line (typed, or piped in), each
    reply streamed; /exit, EOF or Ctrl-C ends it."""
    typed = typed_sampling(ns)
    history = [{"role": "system", "content": ns.system}] if ns.system else []
    with open_llm(ns) as llm:
        params = sampling_params_from(llm, typed, fallback={"max_tokens": CHAT_MAX_TOKENS})
        if ns.message is not None:
            stream_reply(llm, [*history, {"role": "user", "content": ns.message}], params)
            return 0
        interactive = stdin_is_terminal()
        if interactive and not ns.quiet:
            print(
                f"chatting with {llm.config.model.model or 'the embedded default model'}; /exit or Ctrl-D ends", file=sys.stderr
            )
        try:
            while (message := read_message(interactive)) is not None and message.strip() not in EXIT_COMMANDS:
                if message.strip():
                    history.append({"role": "user", "content": message})
                    history.append({"role": "assistant", "content": stream_reply(llm, history, params)})
        except KeyboardInterrupt:
            print()
    return 0


def read_message(interactive: bool) -> str | None:
    """The next line the user gives (None at EOF), with line editing in a terminal."""
    if interactive:
        try:
            return input("> ")
        except EOFError:
            print()
            return None
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None


def stream_reply(llm: LLM, messages: list[dict], params: SamplingParams) -> str:
    """Print the reply to `messages` as it is generated; return its whole text. Interrupting it
    aborts the request (the engine stays usable)."""
    shown = final = ""
    with contextlib.closing(llm.stream_chat(messages, params)) as outputs:
        for output in outputs:
            final = output.outputs[0].text
            if final.startswith(shown):
                sys.stdout.write(final[len(shown) :])
                sys.stdout.flush()
                shown = final
    print(final[len(shown) :] if final.startswith(shown) else "")
    return final


def cmd_serve(ns: argparse.Namespace) -> int:
    from driver.entrypoints.serve import run_server

    for flag, value in (("--max-ongoing-requests", ns.max_ongoing_requests), ("--shutdown-timeout", ns.shutdown_timeout)):
        if value is not None and value < (1 if flag == "--max-ongoing-requests" else 0):
            raise ConfigError(f"{flag} {value} must be {'at least 1' if flag == '--max-ongoing-requests' else 'non-negative'}")
    run_server(
        engine_args_from(ns),
        ns.host,
        ns.port,
        num_replicas=ns.num_replicas,
        model_id=ns.served_model_name,
        max_ongoing_requests=ns.max_ongoing_requests,
        max_queued_requests=ns.max_queued_requests,
        api_key=ns.api_key,
        shutdown_timeout_s=ns.shutdown_timeout,
    )
    return 0


def cmd_plan(ns: argparse.Namespace) -> int:
    """Print the plan; exit 0 when it fits, 3 when it does not, 2 (one line on stderr) when the
    layout does not split."""
    from driver.entrypoints.planner import plan

    args = engine_args_from(ns)
    result = plan(args, "cpu" if args.device == "cpu" else "cuda", ns.gpu_memory, ns.gpu_capability)
    if ns.json:
        print(json.dumps(result.to_builtins()))
    if not result.valid:
        fits = [s for s in result.suggestions if "tensor_parallel_size" in s.changes]
        raise ConfigError(
            f"tensor_parallel_size={args.tensor_parallel_size} does not split the model: {result.problem} "
            f"It splits into {', '.join(map(str, result.split_sizes))} ranks" + (f"; use {fits[0].format()}" if fits else ""),
            field="tensor_parallel_size",
        )
    if not ns.json:
        print(ns.spell(result.format()))
    return EXIT_OK if result.fits else EXIT_DOES_NOT_FIT


def msgspec_to_builtins(obj: object) -> object:
    import msgspec

    return msgspec.to_builtins(obj)


def cmd_bench(ns: argparse.Namespace) -> int:
    if ns.bench_command == "throughput":
        return cmd_bench_throughput(ns)
    if ns.bench_command == "latency":
        return cmd_bench_latency(ns)
    if ns.bench_command == "prefix":
        return cmd_bench_prefix(ns)
    if ns.bench_command == "start":
        return cmd_bench_start(ns)
    if ns.bench_command == "serve":
        return cmd_bench_serve(ns)
    from driver.entrypoints.bench.throughput import bench_load, format_bench_load

    results = bench_load(
        ns.model,
        ns.dtype,
        ns.repeat,
        ns.tensor_parallel_size,
        ns.safetensors_load_strategy,
        engine=ns.engine,
    )
    print(json.dumps(results) if ns.json else format_bench_load(ns.model, ns.dtype, results))
    return 0


def cmd_download(ns: argparse.Namespace) -> int:
    from driver.entrypoints.download import cmd_download as download

    return download(ns)


def cmd_save_sharded(ns: argparse.Namespace) -> int:
    with open_llm(ns) as llm:
        llm.save_sharded_state(ns.output, max_size=ns.max_size)
    tp = llm.config.parallel.tensor_parallel_size
    print(f"wrote {tp} rank(s)' tensors to {ns.output}: load them with --model {ns.output} -tp {tp}")
    return 0


def cmd_bench_start(ns: argparse.Namespace) -> int:
    from driver.entrypoints.bench.start import bench_start, format_bench_start

    args = engine_args_from(ns)
    args.validate()
    runs = bench_start(changed_engine_args(ns), ns.repeat)
    print(json.dumps(runs) if ns.json else format_bench_start(runs, args.tensor_parallel_size))
    return 0


def cmd_bench_prefix(ns: argparse.Namespace) -> int:
    from driver.entrypoints.bench.prefix import format_prefix, run_prefix

    engine = changed_engine_args(ns)
    engine.pop("enable_prefix_caching", None)  # both settings are run
    rows = run_prefix(engine, ns.prompt_len, ns.output_len, ns.bench_seed)
    setup = f"{ns.model or 'default model'}, {ns.prompt_len}-token prompt, {ns.output_len} new tokens"
    print(json.dumps(rows) if ns.json else format_prefix(setup, rows))
    return 0


def cmd_bench_throughput(ns: argparse.Namespace) -> int:
    from driver.entrypoints.bench import throughput as bench

    args = engine_args_from(ns)
    config = args.create_engine_config()
    lengths = (ns.input_len, ns.input_len_max or (4 * ns.input_len if ns.mixed else ns.input_len))
    out_lengths = (ns.output_len_min or (max(1, ns.output_len // 8) if ns.mixed else ns.output_len), ns.output_len)
    if not 1 <= out_lengths[0] <= out_lengths[1] or lengths[0] > lengths[1]:
        raise ValueError(f"no lengths to draw from: input {lengths[0]}-{lengths[1]}, output {out_lengths[0]}-{out_lengths[1]}")
    if ns.repeat < 1:
        raise ValueError(f"--repeat {ns.repeat}: give at least 1")
    input_lens = bench.random_lengths(ns.num_prompts, lengths, ns.bench_seed)
    output_lens = bench.random_lengths(ns.num_prompts, out_lengths, ns.bench_seed + 1)
    weights = config.model.path if config.model.gguf_file is None else f"{config.model.path}/{config.model.gguf_file}"
    ours, theirs = bench.interleaved_throughput(
        {**changed_engine_args(ns), "show_progress": not ns.quiet},
        weights,
        config.model.dtype,
        input_lens,
        output_lens,
        config.model.arch.vocab_size,
        ns.bench_seed,
        ns.repeat,
    )
    setup = (
        f"{config.model.model or 'default'} ({config.model.dtype}, {config.model.device}, tp={args.tensor_parallel_size}), "
        f"{ns.num_prompts} prompts x {bench.span(lengths)} tokens, {bench.span(out_lengths)} new tokens each, "
        f"best of {ns.repeat}"
    )
    if ns.json:
        print(
            json.dumps(
                {"setup": setup, "shardlm": ours, "transformers": theirs, "ratio": ours["tokens_per_s"] / theirs["tokens_per_s"]}
            )
        )
    else:
        print(bench.format_throughput(setup, ours, theirs))
    return 0


def cmd_bench_serve(ns: argparse.Namespace) -> int:
    """Exit 0 when every request succeeded, else 1."""
    from driver.entrypoints.bench.serve import ServeBench, bench_serve, format_bench_serve

    bench = ServeBench(
        url=ns.url,
        endpoint=ns.endpoint,
        model=ns.model_name,
        num_prompts=ns.num_prompts,
        input_len=ns.input_len,
        output_len=ns.output_len,
        request_rate=ns.request_rate,
        max_concurrency=ns.max_concurrency,
        prompt=ns.prompt,
        bench_seed=ns.bench_seed,
        api_key=ns.api_key,
        timeout_s=ns.timeout_s,
        port=ns.port,
    )
    engine = changed_engine_args(ns)
    if ns.url is not None and engine:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in engine)
        raise ValueError(f"--url benchmarks a running server: {flags} would be ignored (--model-name names its model)")
    result = bench_serve(bench, None if ns.url is not None else engine, show_progress=not ns.quiet)
    print(json.dumps(result, allow_nan=False) if ns.json else format_bench_serve(result))
    return EXIT_OK if result["failures"] == 0 else EXIT_FAILED


def cmd_bench_latency(ns: argparse.Namespace) -> int:
    import tempfile

    from driver.entrypoints.bench.latency import bench_latency, format_latency, tiny_llama_folder

    if ns.output_len < 2:
        raise ValueError(f"output_len={ns.output_len}: a decode step needs at least 2 new tokens")
    engine = {**changed_engine_args(ns), "show_progress": not ns.quiet}
    with tempfile.TemporaryDirectory(prefix="shardlm-tiny-") as tmp:
        if ns.tiny:
            if ns.model is not None:
                raise ValueError("give --tiny or --model, not both")
            engine.update(model=str(tiny_llama_folder(Path(tmp))), load_format="dummy", skip_tokenizer_init=True)
        result = bench_latency(engine, ns.batch_sizes, ns.input_len, ns.output_len, ns.repeat, ns.bench_seed)
        if ns.tiny:
            result["setup"]["model"] = "tiny Llama (hidden 64, 2 layers)"
    print(json.dumps(result) if ns.json else format_latency(result))
    return 0


def _freeze_objects() -> None:
    """At exit: put every object out of the garbage collector's reach, so that the interpreter's
    last collections skip torch's objects (half a second). Not with triton loaded: its bindings
    would report the objects left as leaks."""
    if "triton" not in sys.modules:
        gc.freeze()


COMMANDS = {
    "generate": cmd_generate,
    "chat": cmd_chat,
    "serve": cmd_serve,
    "plan": cmd_plan,
    "bench": cmd_bench,
    "save-sharded": cmd_save_sharded,
    "download": cmd_download,
}


class FlagSpelling:
    """Rewrites messages written for Python (`max_model_len=999999`, `use max_model_len <= 131072`)
    into the flags of the command line, spelt as the user typed them (`-tp 3`) or else long.

    `name=value` becomes `--flag value` for every flag; a bare name only where it cannot be an
    ordinary word: a snake_case name, or the error's own `field` opening the message
    ("temperature must be non-negative")."""

    def __init__(self, parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
        typed = {arg.split("=", 1)[0] for arg in argv if arg.startswith("-")}
        self.flags: dict[str, str] = {}
        for action in (a for p in all_parsers(parser) for a in p._actions):
            options = [o for o in action.option_strings if o.startswith("-")]
            if options and action.dest != "help" and action.dest not in self.flags:
                self.flags[action.dest] = next((o for o in options if o in typed), max(options, key=len))

    def __call__(self, message: str, field: str | None = None) -> str:
        for dest, flag in self.flags.items():
            message = re.sub(
                rf"(?<![\w./'\"-]){dest}=('[^']*'|\"[^\"]*\"|[^\s,;)\]]+)", lambda m: f"{flag} {_unquote(m.group(1))}", message
            )
            if "_" in dest:
                message = re.sub(rf"(?<![\w./'\"-]){dest}(?![\w-])", flag, message)
            elif dest == field:
                message = re.sub(rf"^{dest}(?![\w-])", flag, message)
        return message


def _unquote(value: str) -> str:
    """'fp8' -> fp8, as it is typed; a quoted value with spaces keeps its quotes."""
    quoted = len(value) > 1 and value[0] == value[-1] and value[0] in "'\""
    return value[1:-1] if quoted and not any(c.isspace() for c in value) else value


def error_line(exc: BaseException, spell: FlagSpelling) -> str:
    """The one line `shardlm: error: ...` for `exc`, in the command line's words."""
    text = spell(str(exc), getattr(exc, "field", None)) if not isinstance(exc, PromptsError) else str(exc)
    return "shardlm: error: " + "; ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command in `argv` (None: this process's command line, after which it exits)."""
    if argv is None:
        atexit.register(_freeze_objects)
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    ns = parser.parse_args(argv)
    ns.spell = FlagSpelling(parser, argv)
    with log_to_stderr(logging.DEBUG if ns.debug else logging.WARNING if ns.quiet else logging.INFO):
        try:
            return COMMANDS[ns.command](ns)
        except KeyboardInterrupt as exc:
            if type(exc).__name__ == "Terminated":  # cluster.connect's SIGTERM: ended below, quietly
                return EXIT_TERMINATED
            print("\nshardlm: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except (ShardLMError, TypeError, ValueError) as exc:
            if ns.debug:
                traceback.print_exc()
            print(error_line(exc, ns.spell), file=sys.stderr)
            return EXIT_FAILED if isinstance(exc, EngineDeadError) else EXIT_BAD_INPUT
        finally:
            shutdown_local_cluster()


def shutdown_local_cluster() -> None:
    """Shut down the local Ray cluster this process started, if it started one (a command that
    never imported cluster.connect, such as plan, did not: Ray is not even imported for it)."""
    connect = sys.modules.get("cluster.connect")
    if connect is not None:
        connect.shutdown_local_cluster()
