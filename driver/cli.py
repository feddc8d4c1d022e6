"""The `shardlm` command (also `python -m driver`)."""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import logging
import sys
import textwrap
from dataclasses import MISSING, fields
from typing import Any, Sequence

from driver.args import EngineArgs
from parallel.errors import ShardLMError

SHORT_FLAGS = {"tensor_parallel_size": "-tp"}
DEFAULT_PROMPT = "The capital of France is"


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source."""
    docs: dict[str, str] = {}
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    for stmt, after in zip(body, body[1:]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[stmt.target.id] = " ".join(str(after.value.value).split())
    return docs


def _flag_type(annotation: str) -> Any:
    base = annotation.replace(" | None", "").strip()
    return {"int": int, "float": float}.get(base, str)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per `EngineArgs` field, in vLLM's spelling (--tensor-parallel-size, -tp, ...)."""
    docs = field_docs(EngineArgs)
    group = parser.add_argument_group("engine")
    for f in fields(EngineArgs):
        flags = [f"--{f.name.replace('_', '-')}"] + ([SHORT_FLAGS[f.name]] if f.name in SHORT_FLAGS else [])
        default = None if f.default is MISSING else f.default
        help_text = docs.get(f.name, "") + (f" (default: {default})" if default is not None else "")
        if f.type == "bool":
            group.add_argument(*flags, dest=f.name, action="store_true", default=default, help=help_text)
        else:
            group.add_argument(*flags, dest=f.name, type=_flag_type(f.type), default=default, help=help_text)


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    return EngineArgs(**{f.name: getattr(ns, f.name) for f in fields(EngineArgs)})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardlm", description="Tensor-parallel LLM inference on Ray.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="start an engine and complete prompts")
    gen.add_argument("prompts", nargs="*", help=f"prompts (default: {DEFAULT_PROMPT!r})")
    gen.add_argument("--max-tokens", type=int, default=16, help="new tokens per prompt (default: 16)")
    gen.add_argument("--temperature", type=float, default=1.0, help="0 samples greedily (default: 1.0)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--json", action="store_true", help="print machine-readable JSON")
    add_engine_args(gen)

    plan = sub.add_parser("plan", help="does it fit? weights and KV capacity per rank, without loading weights or a GPU")
    plan.add_argument("--gpu-memory", default=None, help="memory of each GPU, e.g. 80GiB (or give --kv-cache-memory-bytes)")
    plan.add_argument("--gpu-capability", default="9.0", help="compute capability, for dtype=auto (default: 9.0)")
    plan.add_argument("--json", action="store_true", help="print machine-readable JSON")
    add_engine_args(plan)

    bench = sub.add_parser("bench", help="measure shardlm beside transformers")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    load = bench_sub.add_parser("load", help="load time and peak memory against from_pretrained")
    load.add_argument("--model", required=True, help="a checkpoint folder or .gguf file")
    load.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    load.add_argument("--repeat", type=int, default=1, help="runs of each; the best is shown")
    load.add_argument("--json", action="store_true", help="print machine-readable JSON")

    tput = bench_sub.add_parser("throughput", help="offline generation against transformers' batched generate")
    tput.add_argument("--num-prompts", type=int, default=64)
    tput.add_argument("--input-len", type=int, default=32, help="prompt length (the shortest, with --input-len-max)")
    tput.add_argument("--input-len-max", type=int, default=None, help="draw prompt lengths from [input-len, this]")
    tput.add_argument("--output-len", type=int, default=64)
    tput.add_argument("--bench-seed", type=int, default=0, help="seed of the random prompts")
    tput.add_argument("--json", action="store_true", help="print machine-readable JSON")
    add_engine_args(tput)
    return parser


def cmd_generate(ns: argparse.Namespace) -> int:
    from driver.llm import LLM
    from workers.sampling_params import SamplingParams

    args = engine_args_from(ns)
    params = SamplingParams(max_tokens=ns.max_tokens, temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k)
    prompts = ns.prompts or [DEFAULT_PROMPT]
    engine_args = {f.name: getattr(args, f.name) for f in fields(EngineArgs) if getattr(args, f.name) != f.default}
    with LLM(**engine_args) as llm:
        outputs = llm.generate(prompts, params, use_tqdm=not ns.json)
        report = llm.load_report
    if ns.json:
        texts = [{"prompt": p, "text": o.outputs[0].text, "token_ids": o.outputs[0].token_ids,
                  "finish_reason": o.outputs[0].finish_reason} for p, o in zip(prompts, outputs)]
        print(json.dumps({"load_report": json.loads(report.to_json()), "outputs": texts}))
        return 0
    print(report.format())
    for prompt, out in zip(prompts, outputs):
        print(f"\n{prompt!r} -> {out.outputs[0].text!r}")
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
    from driver.bench import bench_load, format_bench_load

    results = bench_load(ns.model, ns.dtype, ns.repeat)
    print(json.dumps(results) if ns.json else format_bench_load(ns.model, ns.dtype, results))
    return 0


def cmd_bench_throughput(ns: argparse.Namespace) -> int:
    from driver import bench

    args = engine_args_from(ns)
    config = args.create_engine_config()
    lengths = (ns.input_len, ns.input_len_max or ns.input_len)
    prompts = bench.random_prompts(ns.num_prompts, lengths, config.model.arch.vocab_size, ns.bench_seed)
    engine_args = {f.name: getattr(args, f.name) for f in fields(EngineArgs) if getattr(args, f.name) != f.default}
    ours = bench.run_shardlm_throughput(engine_args, prompts, ns.output_len)
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


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if ns.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"generate": cmd_generate, "plan": cmd_plan, "bench": cmd_bench}[ns.command](ns)
    except (ShardLMError, TypeError, ValueError) as exc:
        if ns.debug:
            raise
        print(f"shardlm: error: {exc}", file=sys.stderr)
        print("(run with --debug for the traceback)", file=sys.stderr)
        return 2
