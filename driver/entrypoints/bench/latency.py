"""`shardlm bench latency`: milliseconds per decode step at given batch sizes, shardlm beside
transformers' own eager `generate` loop on the same checkpoint, in one run.

Each batch is that many prompts of random token ids, all of one length, generating exactly
`output_len` tokens greedily (no early stop). Prefill is left out of both figures the same way:
a run that generates one token (the prefill alone) is timed too, and

    ms per decode step = (seconds(output_len tokens) - seconds(1 token)) / decode steps * 1000

where shardlm's decode steps are read from the engine's step counter (`llm.stats()["steps"]`)
and transformers' are output_len - 1. Each figure is the best of `repeat` runs; on CPU the two
libraries' runs take turns, so that a machine whose speed drifts during the bench slows both alike.

On CUDA, the memory-bandwidth roofline: a decode step reads every weight once, so it takes at
least (weight bytes of one rank) / (the device's copy bandwidth). The ranks each read their own
slice on their own device at once, so the bytes are the largest rank's (at tp=1, the model's).
The fraction reached is roofline ms / measured ms at batch 1.

`tiny_llama_folder` writes the config of issue 11's tiny Llama (hidden 64, 2 layers): with
`load_format="dummy"` its compute is near nothing, so its step time is the engine's overhead.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from driver.entrypoints.bench.throughput import random_prompts

TINY_LLAMA = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
    torch_dtype="float32",
)
"""issue 11's tiny Llama: compute near nothing, so a step's time is the engine's own."""


def tiny_llama_folder(folder: Path) -> Path:
    """Write the tiny Llama's config.json (no weights, no tokenizer) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(TINY_LLAMA))
    return folder


# -- the arithmetic ----------------------------------------------------------------------------


def ms_per_step(full_s: float, prefill_s: float, decode_steps: int) -> float:
    """Milliseconds per decode step: the time of a whole run less its prefill run's, per step."""
    if decode_steps <= 0:
        raise ValueError(f"no decode steps to time (decode_steps={decode_steps}): use output_len >= 2")
    return (full_s - prefill_s) / decode_steps * 1000


def roofline_ms(weight_bytes: int, gb_per_s: float) -> float:
    """The least milliseconds a decode step can take: its weights read once at the device's bandwidth."""
    return weight_bytes / (gb_per_s * 1e9) * 1000


def roofline_fraction(roofline: float, measured_ms: float) -> float:
    """How near the bandwidth limit a step comes: 1.0 is the limit itself."""
    return roofline / measured_ms


def ratios(ours: dict[int, float], theirs: dict[int, float]) -> dict[int, float]:
    """shardlm / transformers ms per step, per batch size (below 1: shardlm's steps are shorter)."""
    return {b: ours[b] / theirs[b] for b in ours if b in theirs}


Timer = Callable[[int], tuple[float, int]]
"""new tokens -> (seconds to generate them for a whole batch, decode steps + 1 it took)."""


def measure(timers: dict[str, Callable[[int], Timer]], batch_sizes: list[int], output_len: int, repeat: int) -> dict[str, dict]:
    """Per library (`timers`: name -> a batch size's timer) and batch size: ms per decode step, the
    steps counted and the best prefill and full runs. Runs take turns (a prefill and a full run of
    each library, `repeat` times), so that a machine whose speed drifts slows every library alike."""
    rows: dict[str, dict[int, dict[str, float]]] = {name: {} for name in timers}
    for batch in batch_sizes:
        timed = {name: make(batch) for name, make in timers.items()}
        runs: dict[str, list[tuple[tuple[float, int], tuple[float, int]]]] = {name: [] for name in timers}
        for _ in range(repeat):
            for name, timer in timed.items():
                runs[name].append((timer(1), timer(output_len)))
        for name, pairs in runs.items():
            prefill_s, prefill_steps = min((p for p, _ in pairs), key=lambda r: r[0])
            full_s, full_steps = min((f for _, f in pairs), key=lambda r: r[0])
            decode_steps = full_steps - prefill_steps
            rows[name][batch] = {
                "ms_per_step": ms_per_step(full_s, prefill_s, decode_steps),
                "decode_steps": decode_steps,
                "prefill_s": prefill_s,
                "full_s": full_s,
            }
    return rows


# -- shardlm -----------------------------------------------------------------------------------


def shardlm_timers(llm: Any, input_len: int, output_len: int, seed: int) -> Callable[[int], Timer]:
    """A batch size's timer of `llm.generate` (fresh random prompts every run: no prefix-cache
    hits), warmed at the largest batch first by the caller; steps from the engine's counter."""
    vocab = llm.config.model.arch.vocab_size
    draw = iter(range(seed * 1000, seed * 1000 + 100_000))

    def make(batch: int) -> Timer:
        return lambda new_tokens: _timed_generate(
            llm, random_prompts(batch, (input_len, input_len), vocab, next(draw)), new_tokens
        )

    return make


def _timed_generate(llm: Any, prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
    """Seconds and engine steps to generate `max_tokens` for every prompt at once."""
    from workers.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    steps = llm.stats()["steps"]
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - start, llm.stats()["steps"] - steps


# -- transformers ------------------------------------------------------------------------------


def transformers_model(folder: str, dtype: str, dummy: bool, device: str) -> Any:
    """transformers' model of the checkpoint; with `dummy`, built from its config with random weights
    (a folder holding a config.json alone)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from driver.entrypoints.bench.throughput import _load_transformers_model

    if dummy:
        config = AutoConfig.from_pretrained(folder)
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    else:
        model = _load_transformers_model(folder, dtype)
    return model.to(device).eval()


def transformers_timers(model: Any, input_len: int, output_len: int, vocab: int, seed: int) -> Callable[[int], Timer]:
    """A batch size's timer of `generate` (greedy, exactly the new tokens asked for), warmed once."""
    import torch

    device = next(model.parameters()).device

    def timed(ids: torch.Tensor, new_tokens: int) -> tuple[float, int]:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, new_tokens

    def make(batch: int) -> Timer:
        ids = torch.tensor(random_prompts(batch, (input_len, input_len), vocab, seed), device=device)
        timed(ids, min(output_len, 4))  # warm
        return lambda new_tokens: timed(ids, new_tokens)

    return make


# -- the device's bandwidth (CUDA) -------------------------------------------------------------


def device_copy_gb_per_s(nbytes: int = 1 << 30, iters: int = 10) -> float:
    """GB/s of memory traffic of a device-to-device copy (each byte read once and written once,
    counted twice), as CUDA's bandwidthTest reports it."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes * iters / seconds / 1e9


def roofline(rank_weight_bytes: list[int], gb_per_s: float, batch1_ms: float | None) -> dict[str, float]:
    """The bandwidth limit of a decode step and, where batch 1 was measured, the fraction reached."""
    weight_bytes = max(rank_weight_bytes)
    row = {"weight_bytes": weight_bytes, "copy_gb_per_s": gb_per_s, "roofline_ms": roofline_ms(weight_bytes, gb_per_s)}
    if batch1_ms is not None:
        row["fraction_at_batch_1"] = roofline_fraction(row["roofline_ms"], batch1_ms)
    return row


# -- the whole bench ---------------------------------------------------------------------------


def bench_latency(
    engine_args: dict[str, Any],
    batch_sizes: list[int],
    input_len: int,
    output_len: int,
    repeat: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """shardlm and transformers taking turns on CPU (on CUDA transformers after the engine has let
    go of the device), then on CUDA the device's bandwidth: everything `format_latency` prints,
    JSON-ready."""
    import torch

    from driver.entrypoints.llm import LLM

    with LLM(**engine_args) as llm:
        config, weights = llm.config, [r.weight_device_bytes for r in llm.load_report.ranks]
        ours = shardlm_timers(llm, input_len, output_len, seed)
        ours(max(batch_sizes))(min(output_len, 4))  # warm: first calls, the largest batch
        device = "cuda" if config.model.device == "cuda" else "cpu"
        if device == "cpu":  # both fit in host memory: runs take turns
            theirs = transformers_timers(_transformers_of(config), input_len, output_len, config.model.arch.vocab_size, seed)
            rows = measure({"shardlm": ours, "transformers": theirs}, batch_sizes, output_len, repeat)
        else:
            rows = measure({"shardlm": ours}, batch_sizes, output_len, repeat)
    if device == "cuda":  # transformers once the engine has let go of the device
        hf = _transformers_of(config)
        theirs = transformers_timers(hf, input_len, output_len, config.model.arch.vocab_size, seed)
        rows.update(measure({"transformers": theirs}, batch_sizes, output_len, repeat))
        del hf, theirs
    ours, theirs = rows["shardlm"], rows["transformers"]
    result: dict[str, Any] = {
        "setup": {
            "model": config.model.model or "default",
            "dtype": config.model.dtype,
            "device": config.model.device,
            "tensor_parallel_size": config.parallel.tensor_parallel_size,
            "load_format": config.load.load_format,
            "input_len": input_len,
            "output_len": output_len,
            "repeat": repeat,
        },
        "shardlm": {str(b): r for b, r in ours.items()},
        "transformers": {str(b): r for b, r in theirs.items()},
        "ratio": {str(b): r for b, r in ratios(_ms(ours), _ms(theirs)).items()},
    }
    if device == "cuda" and torch.cuda.is_available():
        result["roofline"] = roofline(weights, device_copy_gb_per_s(), ours[1]["ms_per_step"] if 1 in ours else None)
    return result


def _transformers_of(config: Any) -> Any:
    dummy = config.load.load_format == "dummy"
    device = "cuda" if config.model.device == "cuda" else "cpu"
    path = config.model.path if config.model.gguf_file is None else f"{config.model.path}/{config.model.gguf_file}"
    return transformers_model(path, config.model.dtype, dummy, device)


def _ms(rows: dict[int, dict[str, float]]) -> dict[int, float]:
    return {b: r["ms_per_step"] for b, r in rows.items()}


def format_latency(result: dict[str, Any]) -> str:
    s = result["setup"]
    lines = [
        f"latency: {s['model']} ({s['dtype']}, {s['device']}, tp={s['tensor_parallel_size']}, "
        f"{s['load_format']} weights), prompts of {s['input_len']} tokens, {s['output_len']} new tokens, "
        f"best of {s['repeat']}",
        f"{'batch':>6}{'shardlm ms/step':>18}{'transformers ms/step':>23}{'shardlm / transformers':>25}",
    ]
    for b, ratio in result["ratio"].items():
        ours, theirs = result["shardlm"][b]["ms_per_step"], result["transformers"][b]["ms_per_step"]
        lines.append(f"{b:>6}{ours:>18.2f}{theirs:>23.2f}{ratio:>25.2f}")
    if "roofline" in result:
        r = result["roofline"]
        line = (
            f"roofline: {r['weight_bytes'] / 2**20:.1f} MiB of weights per rank at {r['copy_gb_per_s']:.0f} GB/s "
            f"(device copy) = {r['roofline_ms']:.3f} ms per step"
        )
        if "fraction_at_batch_1" in r:
            line += f"; batch 1 reaches {r['fraction_at_batch_1']:.2f} of it"
        lines.append(line)
    return "\n".join(lines)


def batch_sizes(text: str) -> list[int]:
    """The --batch-sizes flag: "1,8,64" -> [1, 8, 64], positive integers."""
    import argparse

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"give positive integers, e.g. 1,8,64 (not {text!r})")
    return values
