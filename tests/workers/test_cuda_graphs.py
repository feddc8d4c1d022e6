"""CUDA graphs of the decode step: the buckets, when they are on, the memory the profile sets aside.
Replayed against eager logits on a GPU: tests/gpu/engine_check.py."""

from __future__ import annotations

from types import SimpleNamespace

from workers.cuda_graphs import CUDA_GRAPHS_ENV, cuda_graphs_wanted, decode_buckets, pool_reserve_bytes


def test_buckets_are_powers_of_two_to_eight_then_multiples_of_eight() -> None:
    assert decode_buckets(256) == [1, 2, 4, 8] + list(range(16, 257, 8))
    assert decode_buckets(1024)[-1] == 512
    assert decode_buckets(20) == [1, 2, 4, 8, 16, 24]  # 17..20 decodes have a bucket too
    assert decode_buckets(3) == [1, 2, 8] and decode_buckets(1) == [1]


def config(device: str = "cuda", enforce_eager: bool = False) -> SimpleNamespace:
    return SimpleNamespace(model=SimpleNamespace(device=device, enforce_eager=enforce_eager))


def test_graphs_stay_off_until_asked_for_and_enforce_eager_wins(monkeypatch) -> None:
    monkeypatch.delenv(CUDA_GRAPHS_ENV, raising=False)
    assert cuda_graphs_wanted(config()) == (
        False,
        f"eager until CUDA graphs have run on a GPU: set {CUDA_GRAPHS_ENV}=1 to try them",
    )
    monkeypatch.setenv(CUDA_GRAPHS_ENV, "1")
    assert cuda_graphs_wanted(config())[0]
    assert cuda_graphs_wanted(config(enforce_eager=True)) == (False, "enforce_eager=True")
    assert not cuda_graphs_wanted(config(device="cpu"))[0]


def test_the_pool_reserve_scales_the_profiled_activations() -> None:
    assert pool_reserve_bytes(8192 * 1000, 8192, 256) == 256 * 1000 + 64 * 2**20
    assert pool_reserve_bytes(100, 10, 256) == 100 + 64 * 2**20  # never more than the profiled step
