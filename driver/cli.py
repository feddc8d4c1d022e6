"""The `shardlm` command (also `python -m driver`)."""

from __future__ import annotations

import argparse
import ast
import atexit
import contextlib
import functools
import gc
import importlib.util
import inspect
import json
import logging
import os
import stat
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from cluster.connect import shutdown_local_cluster
from cluster.logs import log_to_stderr
from parallel.errors import ShardLMError

if TYPE_CHECKING:
    from driver.args import EngineArgs
    from driver.llm import LLM
    from workers.sampling_params import SamplingParams

SHORT_FLAGS = {"tensor_parallel_size": "-tp"}
DEFAULT_PROMPT = "The capital of France is"
EXIT_COMMANDS = ("/exit", "/quit")


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
    """`EngineArgs`' fields, read from driver/args.py without importing it: the flags are known
    before torch is imported, so that an engine start can import it beside Ray's start."""
    source = Path(importlib.util.find_spec("driver.args").origin).read_text(encoding="utf-8")
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "EngineArgs")
    docs = _docs(node.body)
    return tuple(
        EngineField(
            stmt.target.id, ast.unparse(stmt.annotation), None if stmt.value is None else ast.literal_eval(stmt.value),
            docs.get(stmt.target.id, ""),
        )
        for stmt in node.body
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
    )


def _flag_type(annotation: str) -> Any:
    base = annotation.replace(" | None", "").strip()
    return {"int": int, "float": float}.get(base, str)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per `EngineArgs` field, in vLLM's spelling (--tensor-parallel-size, -tp, ...)."""
    group = parser.add_argument_group("engine")
    for f in engine_fields():
        flags = [f"--{f.name.replace('_', '-')}"] + ([SHORT_FLAGS[f.name]] if f.name in SHORT_FLAGS else [])
        help_text = f.doc + (f" (default: {f.default})" if f.default is not None else "")
        if f.type == "bool":
            group.add_argument(*flags, dest=f.name, action="store_true", default=f.default, help=help_text)
        else:
            group.add_argument(*flags, dest=f.name, type=_flag_type(f.type), default=f.default, help=help_text)


def engine_args_from(ns: argparse.Namespace) -> "EngineArgs":
    from driver.args import EngineArgs

    return EngineArgs(**{f.name: getattr(ns, f.name) for f in engine_fields()})


def changed_engine_args(ns: argparse.Namespace) -> dict[str, Any]:
    """The engine flags that differ from their defaults, as keyword arguments of `LLM` (which
    validates them)."""
    return {f.name: getattr(ns, f.name) for f in engine_fields() if getattr(ns, f.name) != f.default}


def add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    parser.add_argument("--max-tokens", type=int, default=max_tokens, help=f"new tokens per reply (default: {max_tokens})")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 samples greedily (default: 1.0)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)


def add_common_flags(parser: argparse.ArgumentParser, top: bool = False) -> None:
    """--quiet and --debug, accepted before the command and after it (`shardlm generate --quiet`)."""
    default = False if top else argparse.SUPPRESS  # a subcommand must not reset what was given before it
    parser.add_argument("-q", "--quiet", action="store_true", default=default, help="no progress bars or info logs: results, warnings and errors only")
    parser.add_argument("--debug", action="store_true", default=default, help="debug logs, and the traceback of an error")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardlm", description="Tensor-parallel LLM inference on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="start an engine and complete prompts")
    gen.add_argument(
        "prompts", nargs="*",
        help=f"prompts; '-' reads stdin, one prompt a line. With no prompts and no --prompts-file: stdin when it is "
        f"a pipe or a file, else {DEFAULT_PROMPT!r}",
    )
    gen.add_argument("--prompts-file", default=None, help='one prompt a line; in a .jsonl file, {"prompt": ...} or a JSON string a line')
    add_sampling_args(gen, max_tokens=16)
    gen.add_argument("--json", action="store_true", help="print machine-readable JSON")
    add_engine_args(gen)

    chat = sub.add_parser("chat", help="talk with the model through its chat template, a reply streamed as it is generated")
    chat.add_argument("--message", default=None, help="answer this one message and exit (default: read a message a line until /exit or EOF)")
    chat.add_argument("--system", default=None, help="a system prompt at the start of the conversation")
    add_sampling_args(chat, max_tokens=256)
    add_engine_args(chat)

    srv = sub.add_parser("serve", help="serve OpenAI's completions and chat completions API (Ray Serve) until Ctrl-C")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="(default: 8000)")
    srv.add_argument("--served-model-name", default=None, help="the name clients give as `model` (default: --model as given, or the default model's name)")
    srv.add_argument("--num-replicas", type=int, default=1, help="engines serving it, each with its own ranks (default: 1)")
    add_engine_args(srv)

    plan = sub.add_parser("plan", help="does it fit? weights and KV capacity per rank, without loading weights or a GPU")
    plan.add_argument("--gpu-memory", default=None, help="memory of each GPU, e.g. 80GiB (or give --kv-cache-memory-bytes)")
    plan.add_argument("--gpu-capability", default="9.0", help="compute capability, for dtype=auto (default: 9.0)")
    plan.add_argument("--json", action="store_true", help="print machine-readable JSON")
    add_engine_args(plan)

    save = sub.add_parser("save-sharded", help="write each rank's final tensors (sharded_state) for fast later starts")
    save.add_argument("output", help="the folder to write: model-rank-R-part-P.safetensors, config, tokenizer, manifest")
    save.add_argument("--max-size", type=int, default=None, help="the most bytes per file (default: 5 GiB)")
    add_engine_args(save)

    bench = sub.add_parser("bench", help="measure shardlm beside transformers")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    load = bench_sub.add_parser("load", help="load time and peak memory against from_pretrained")
    load.add_argument("--model", required=True, help="a checkpoint folder or .gguf file")
    load.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    load.add_argument("--repeat", type=int, default=1, help="runs of each; the best is shown")
    load.add_argument("-tp", "--tensor-parallel-size", type=int, default=1, help="ranks, each loading in its own process")
    load.add_argument("--safetensors-load-strategy", default="auto", choices=["auto", "page_cache", "direct"])
    load.add_argument("--engine", action="store_true", help="also time one whole LLM(...) start, phase by phase")
    load.add_argument("--json", action="store_true", help="print machine-readable JSON")

    start = bench_sub.add_parser("start", help="a whole LLM(...) start, phase by phase, over fresh processes")
    start.add_argument("--repeat", type=int, default=3, help="fresh processes, one after another (default: 3)")
    start.add_argument("--json", action="store_true", help="print machine-readable JSON: every run's seconds")
    add_engine_args(start)

    tput = bench_sub.add_parser("throughput", help="offline generation against transformers' batched generate")
    tput.add_argument("--num-prompts", type=int, default=64)
    tput.add_argument("--input-len", type=int, default=32, help="prompt length (the shortest, with --input-len-max)")
    tput.add_argument("--input-len-max", type=int, default=None, help="draw prompt lengths from [input-len, this]")
    tput.add_argument("--output-len", type=int, default=64)
    tput.add_argument("--bench-seed", type=int, default=0, help="seed of the random prompts")
    tput.add_argument("--json", action="store_true", help="print machine-readable JSON")
    add_engine_args(tput)

    for command in [parser, *sub.choices.values(), *bench_sub.choices.values()]:
        add_common_flags(command, top=command is parser)
    return parser


def open_llm(ns: argparse.Namespace) -> "LLM":
    """The engine a command asked for, with progress bars unless --quiet."""
    from driver.llm import LLM

    return LLM(**changed_engine_args(ns), show_progress=not ns.quiet)


def sampling_params_from(ns: argparse.Namespace) -> "SamplingParams":
    from workers.sampling_params import SamplingParams

    return SamplingParams(max_tokens=ns.max_tokens, temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k)


def cmd_generate(ns: argparse.Namespace) -> int:
    params = sampling_params_from(ns)
    prompts = read_prompts(ns)
    with open_llm(ns) as llm:
        outputs = llm.generate(prompts, params, use_tqdm=not ns.quiet)
        report = llm.load_report
    if ns.json:
        texts = [{"prompt": p, "text": o.outputs[0].text, "token_ids": o.outputs[0].token_ids,
                  "finish_reason": o.outputs[0].finish_reason} for p, o in zip(prompts, outputs)]
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
        raise PromptsError("'-' reads prompts from stdin, one a line, but stdin gave none; e.g. echo 'Hello' | shardlm generate -")
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
    params = sampling_params_from(ns)
    history = [{"role": "system", "content": ns.system}] if ns.system else []
    with open_llm(ns) as llm:
        if ns.message is not None:
            stream_reply(llm, [*history, {"role": "user", "content": ns.message}], params)
            return 0
        interactive = stdin_is_terminal()
        if interactive and not ns.quiet:
            print(f"chatting with {llm.config.model.model or 'the embedded default model'}; /exit or Ctrl-D ends", file=sys.stderr)
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


def stream_reply(llm: "LLM", messages: list[dict], params: "SamplingParams") -> str:
    """Print the reply to `messages` as it is generated; return its whole text. Interrupting it
    aborts the request (the engine stays usable)."""
    shown = final = ""
    with contextlib.closing(llm.stream_chat(messages, params)) as outputs:
        for output in outputs:
            final = output.outputs[0].text
            if final.startswith(shown):
                sys.stdout.write(final[len(shown):])
                sys.stdout.flush()
                shown = final
    print(final[len(shown):] if final.startswith(shown) else "")
    return final


def cmd_serve(ns: argparse.Namespace) -> int:
    from driver.serve import run_server

    run_server(engine_args_from(ns), ns.host, ns.port, num_replicas=ns.num_replicas, model_id=ns.served_model_name)
    return 0


def cmd_plan(ns: argparse.Namespace) -> int:
    from driver.planner import parse_size, plan

    args = engine_args_from(ns)
    device = "cpu" if args.device == "cpu" else "cuda"
    capability = tuple(int(x) for x in ns.gpu_capability.split("."))
    gpu_memory = parse_size(ns.gpu_memory) if ns.gpu_memory else None
    result = plan(args, device, gpu_memory, capability)
    print(json.dumps(msgspec_to_builtins(result)) if ns.json else result.format())
    return 0 if result.fits else 1


def msgspec_to_builtins(obj: object) -> object:
    import msgspec

    return msgspec.to_builtins(obj)


def cmd_bench(ns: argparse.Namespace) -> int:
    if ns.bench_command == "throughput":
        return cmd_bench_throughput(ns)
    if ns.bench_command == "start":
        return cmd_bench_start(ns)
    from driver.bench import bench_load, format_bench_load

    results = bench_load(
        ns.model, ns.dtype, ns.repeat, ns.tensor_parallel_size, ns.safetensors_load_strategy, engine=ns.engine,
    )
    print(json.dumps(results) if ns.json else format_bench_load(ns.model, ns.dtype, results))
    return 0


def cmd_save_sharded(ns: argparse.Namespace) -> int:
    with open_llm(ns) as llm:
        llm.save_sharded_state(ns.output, max_size=ns.max_size)
    tp = llm.config.parallel.tensor_parallel_size
    print(f"wrote {tp} rank(s)' tensors to {ns.output}: load them with --model {ns.output} -tp {tp}")
    return 0


def cmd_bench_start(ns: argparse.Namespace) -> int:
    from driver.bench_start import bench_start, format_bench_start

    args = engine_args_from(ns)
    args.validate()
    runs = bench_start(changed_engine_args(ns), ns.repeat)
    print(json.dumps(runs) if ns.json else format_bench_start(runs, args.tensor_parallel_size))
    return 0


def cmd_bench_throughput(ns: argparse.Namespace) -> int:
    from driver import bench

    args = engine_args_from(ns)
    config = args.create_engine_config()
    lengths = (ns.input_len, ns.input_len_max or ns.input_len)
    prompts = bench.random_prompts(ns.num_prompts, lengths, config.model.arch.vocab_size, ns.bench_seed)
    ours = bench.run_shardlm_throughput({**changed_engine_args(ns), "show_progress": not ns.quiet}, prompts, ns.output_len)
    weights = config.model.path if config.model.gguf_file is None else f"{config.model.path}/{config.model.gguf_file}"
    theirs = bench.run_transformers_throughput(weights, config.model.dtype, prompts, ns.output_len)
    setup = (
        f"{config.model.model or 'default'} ({config.model.dtype}, {config.model.device}, tp={args.tensor_parallel_size}), "
        f"{ns.num_prompts} prompts x {lengths[0]}{'-' + str(lengths[1]) if lengths[1] != lengths[0] else ''} tokens, "
        f"{ns.output_len} new tokens each"
    )
    if ns.json:
        print(json.dumps({"setup": setup, "shardlm": ours, "transformers": theirs, "ratio": ours["tokens_per_s"] / theirs["tokens_per_s"]}))
    else:
        print(bench.format_throughput(setup, ours, theirs))
    return 0


def _freeze_objects() -> None:
    """At exit: put every object out of the garbage collector's reach, so that the interpreter's
    last collections skip torch's objects (half a second). Not with triton loaded: its bindings
    would report the objects left as leaks."""
    if "triton" not in sys.modules:
        gc.freeze()


COMMANDS = {
    "generate": cmd_generate, "chat": cmd_chat, "serve": cmd_serve, "plan": cmd_plan, "bench": cmd_bench,
    "save-sharded": cmd_save_sharded,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command in `argv` (None: this process's command line, after which it exits)."""
    ns = build_parser().parse_args(argv)
    if argv is None:
        atexit.register(_freeze_objects)
    with log_to_stderr(logging.DEBUG if ns.debug else logging.WARNING if ns.quiet else logging.INFO):
        try:
            return COMMANDS[ns.command](ns)
        except KeyboardInterrupt:
            print("\nshardlm: interrupted", file=sys.stderr)
            return 130
        except (ShardLMError, TypeError, ValueError) as exc:
            if ns.debug:
                raise
            print(f"shardlm: error: {exc}", file=sys.stderr)
            if not isinstance(exc, PromptsError):  # its message says all there is to say
                print("(run with --debug for the traceback)", file=sys.stderr)
            return 2
        finally:
            shutdown_local_cluster()
