"""Time the quantized linear kernels against bfloat16 F.linear on a GPU, and check them.

    python -m kernels.bench --out DIR

For each layer shape (N x K) and activation rows M (1: one decode step; 64: a batch of decodes),
each kernel is timed as the median over replays of a CUDA graph of many calls (so launch gaps do
not count), the calls cycling through enough copies of the weights that they come from memory,
not from the L2 cache, as in a real forward pass. Each kernel is also checked against its torch
reference on the same inputs (max abs error, and that over max |reference|). Prints a table and
writes DIR/kernels.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (576, 1536)]
"""(N, K): a square projection, an MLP's up and down projections, and SmolLM2-135M's MLP."""
ROWS = [1, 64]
GROUP = 128
COLD_BYTES = 256 << 20
"""Weights cycled through per timing: several times any GPU's L2 cache."""


def time_us(call: Callable[[int], torch.Tensor], copies: int, replays: int) -> float:
    """Median microseconds of one call(i), i cycling through the weight copies, in graph replays."""
    for i in range(copies):  # compiles, and warms the allocator
        call(i)
    torch.cuda.synchronize()
    calls = copies * math.ceil(32 / copies)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            call(i % copies)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return statistics.median(times)


def error(got: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(max abs error, that over max |expected|)."""
    diff = float((got.float() - expected.float()).abs().max())
    return diff, diff / max(float(expected.float().abs().max()), 1e-30)


def kernels_for(n: int, k: int) -> dict[str, tuple[Callable, Callable, list[tuple], int]]:
    """name -> (kernel, its reference, one argument tuple per weight copy, weight bytes)."""
    from kernels.fp8_linear import fp8_linear_ref, fp8_linear_scaled_mm, fp8_linear_triton, quantize_fp8_rows
    from kernels.int4_linear import int4_linear_ref, int4_linear_triton, pack_int4_rows
    from kernels.int8_linear import int8_linear_ref, int8_linear_triton, quantize_int8_rows

    w = torch.randn(n, k, device="cuda") * 0.02
    q8, s8 = quantize_fp8_rows(w)
    qi, si = quantize_int8_rows(w)
    q4 = torch.randint(0, 16, (k, n), device="cuda")
    scales = (torch.rand(k // GROUP, n, device="cuda") * 0.01).to(torch.bfloat16)
    zeros = torch.full((k // GROUP, n), 8.0, device="cuda", dtype=torch.bfloat16)
    g_idx = (torch.arange(k, device="cuda") // GROUP).to(torch.int32)
    packed = pack_int4_rows(q4)

    def copies(*args: torch.Tensor) -> list[tuple]:
        size = sum(a.numel() * a.element_size() for a in args)
        return [tuple(a.clone() for a in args) for _ in range(min(256, math.ceil(COLD_BYTES / size)))]

    def bf16_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), weight.float())

    fp8 = copies(q8, s8)
    table = {
        "bf16": (F.linear, bf16_ref, copies(w.to(torch.bfloat16)), n * k * 2),
        "fp8_triton": (fp8_linear_triton, fp8_linear_ref, fp8, n * k),
        "int8_triton": (int8_linear_triton, int8_linear_ref, copies(qi, si), n * k),
        f"int4_g{GROUP}_triton": (int4_linear_triton, int4_linear_ref, copies(packed, scales, zeros, g_idx), n * k // 2),
        f"int4_g{GROUP}_grouped": (
            functools.partial(int4_linear_triton, group_size=GROUP),
            int4_linear_ref,
            copies(packed, scales, zeros, g_idx),
            n * k // 2,
        ),
    }
    if torch.cuda.get_device_capability() >= (8, 9):
        table["fp8_scaled_mm"] = (fp8_linear_scaled_mm, fp8_linear_ref, fp8, n * k)
    return table


def run(replays: int) -> list[dict]:
    results = []
    for n, k in SHAPES:
        table = kernels_for(n, k)
        for m in ROWS:
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            base = None
            for name, (kernel, reference, args, weight_bytes) in table.items():
                us = time_us(lambda i: kernel(x, *args[i % len(args)]), len(args), replays)
                base = base or us
                abs_err, rel_err = error(kernel(x, *args[0]), reference(x, *args[0]))
                results.append(
                    dict(
                        n=n,
                        k=k,
                        m=m,
                        kernel=name,
                        us=us,
                        ratio_to_bf16=us / base,
                        weight_gb_per_s=weight_bytes / us / 1e3,
                        max_abs_err=abs_err,
                        rel_err=rel_err,
                    )
                )
                print_row(results[-1])
            torch.cuda.empty_cache()
    return results


def print_row(r: dict) -> None:
    print(
        f"{r['n']:>6} x {r['k']:<6} M={r['m']:<3} {r['kernel']:<16} {r['us']:>9.1f} us  x{r['ratio_to_bf16']:<5.2f}"
        f" {r['weight_gb_per_s']:>7.0f} GB/s   check: max abs err {r['max_abs_err']:.2e} ({r['rel_err']:.1e} of max |ref|)",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for kernels.json")
    parser.add_argument("--replays", type=int, default=50, help="graph replays per timing (the median is kept)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernels.bench needs a CUDA GPU, and torch sees none here", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    print(f"{device}, torch {torch.__version__}; N x K, rows M, kernel, median time, ratio to bf16, weight bytes / time")
    results = run(args.replays)
    import triton

    args.out.mkdir(parents=True, exist_ok=True)
    report = dict(device=device, torch=torch.__version__, triton=triton.__version__, group_size=GROUP, results=results)
    (args.out / "kernels.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out / 'kernels.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
