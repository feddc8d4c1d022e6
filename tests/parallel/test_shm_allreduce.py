"""The shared-memory collectives against gloo's, in real processes (2 and 3 ranks), and their fallbacks."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import random
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch

from parallel import shm_allreduce
from parallel.shm_allreduce import CollectiveTimeout, PeerExited, ShmCommunicator

pytestmark = pytest.mark.skipif(not shm_allreduce.supported(), reason="shared-memory collectives need x86-64")

SHAPES = [(1,), (7,), (3, 5), (1, 65), (2, 1023)]
DTYPES = [torch.float32, torch.bfloat16]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, size: int, port: int, body: Callable[..., Any], args: tuple, results: Any) -> None:
    import torch.distributed as dist

    from parallel.state import destroy_tensor_parallel, init_tensor_parallel

    try:
        torch.set_num_threads(1)
        tp = init_tensor_parallel(rank, size, "127.0.0.1", port, "gloo", 30.0)
        try:
            results.put((rank, pickle.dumps(body(tp, dist, *args)), None))  # plain pickle: no fds to pass
        finally:
            destroy_tensor_parallel(tp)
    except BaseException:  # noqa: BLE001  reported to the test
        results.put((rank, None, traceback.format_exc()))


def run_ranks(
    size: int, body: Callable[..., Any], *args: Any, env: dict[str, str] | None = None, timeout_s: float = 120
) -> list[Any]:
    """`body(tp, dist, *args)` on `size` fresh processes joined by `init_tensor_parallel`; each rank's answer."""
    ctx = multiprocessing.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        procs = [ctx.Process(target=_rank_main, args=(r, size, port, body, args, results)) for r in range(size)]
        for p in procs:
            p.start()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    answers: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(answers) < size:
            try:
                rank, answer, error = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"ranks {sorted(set(range(size)) - set(answers))} did not answer in {timeout_s} s") from None
            assert error is None, f"rank {rank} failed:\n{error}"
            answers[rank] = pickle.loads(answer)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [answers[r] for r in range(size)]


def rank_tensor(rank: int, step: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(shape, generator=g).to(dtype)


def in_rank_order(step: int, shape: tuple[int, ...], dtype: torch.dtype, size: int) -> torch.Tensor:
    total = rank_tensor(0, step, shape, dtype) + rank_tensor(1, step, shape, dtype)
    for r in range(2, size):
        total += rank_tensor(r, step, shape, dtype)
    return total


def compare_with_gloo(tp: Any, dist: Any) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Each shape and dtype summed through shared memory and through gloo; gathers likewise. The
    sums are also checked to be exactly those added in rank order."""
    assert tp.shm is not None, "one host, x86-64: the shared segment should have been set up"
    assert tp.shm.watch_pids, "one host: every rank sees the others' processes"
    out = []
    for step, (shape, dtype) in enumerate((s, d) for s in SHAPES for d in DTYPES):
        mine = rank_tensor(tp.rank, step, shape, dtype)
        ours = tp.all_reduce(mine.clone())
        assert torch.equal(ours, in_rank_order(step, shape, dtype, tp.size)), f"{shape} {dtype}"
        theirs = mine.clone()
        dist.all_reduce(theirs, group=tp.group)
        out.append((f"all_reduce {shape} {dtype}", ours, theirs))
        gathered = tp.gather_last_dim(mine)
        pieces = [torch.empty_like(mine) for _ in range(tp.size)] if tp.rank == 0 else None
        dist.gather(mine, pieces, dst=0, group=tp.group)
        if tp.rank == 0:
            out.append((f"gather {shape} {dtype}", gathered, torch.cat(pieces, dim=-1)))
        else:
            assert gathered is None
    return out


@pytest.mark.parametrize("size", [2, 3])
def test_matches_gloo_on_every_rank(size: int) -> None:
    answers = run_ranks(size, compare_with_gloo)
    for rank, pairs in enumerate(answers):
        for name, ours, theirs in pairs:
            assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, name
            if size == 2 or name.startswith("gather"):  # one addition: the same rounding as gloo's
                assert torch.equal(ours, theirs), f"rank {rank}: {name}"
            else:  # gloo adds each chunk in its own order; bfloat16 then differs by a rounding or two
                tolerance = {"atol": 0.05, "rtol": 0.02} if ours.dtype == torch.bfloat16 else {}
                torch.testing.assert_close(ours, theirs, msg=f"rank {rank}: {name}", **tolerance)
    sums = [{name: ours for name, ours, _ in pairs if name.startswith("all_reduce")} for pairs in answers]
    for name, ours in sums[0].items():  # every rank holds the same bits
        assert all(torch.equal(ours, other[name]) for other in sums[1:]), name


def many_collectives(tp: Any, dist: Any, steps: int) -> int:
    """Interleaved all-reduces and gathers (gathers back to back too), a rank now and then late:
    every result checked against the sum computed here."""
    rng = random.Random(tp.rank)
    for step in range(steps):
        shape = SHAPES[step % len(SHAPES)]
        if rng.random() < 0.05:
            time.sleep(0.002)
        if step % 3:
            x = tp.all_reduce(rank_tensor(tp.rank, step, shape, torch.float32))
            assert torch.equal(x, in_rank_order(step, shape, torch.float32, tp.size)), f"step {step}"
        else:
            x = tp.gather_last_dim(rank_tensor(tp.rank, step, shape, torch.float32))
            if tp.rank == 0:
                expected = torch.cat([rank_tensor(r, step, shape, torch.float32) for r in range(tp.size)], dim=-1)
                assert torch.equal(x, expected), f"step {step}"
    return tp.shm.generation


def test_buffers_are_reused_safely() -> None:
    assert run_ranks(3, many_collectives, 600) == [600, 600, 600]


def fallbacks(tp: Any, dist: Any) -> tuple[bool, list[torch.Tensor], int]:
    """A tensor over the slot size goes through gloo; a strided one is gathered from its contiguous copy."""
    big = torch.full((300,), float(tp.rank + 1))  # 1200 bytes, over the 1024 of the slot
    odd = torch.full((4, 6), float(tp.rank + 1)).t()
    before = tp.shm.generation
    results = [tp.all_reduce(big), tp.gather_last_dim(odd)]
    return tp.shm.fits(big), results, tp.shm.generation - before


def test_a_tensor_over_the_slot_size_falls_back_to_gloo() -> None:
    answers = run_ranks(2, fallbacks, env={shm_allreduce.CAPACITY_ENV: "1024"})
    for rank, (fits, (big, gathered), shm_calls) in enumerate(answers):
        assert not fits
        assert torch.equal(big, torch.full((300,), 3.0))
        if rank == 0:
            assert torch.equal(gathered, torch.cat([torch.full((6, 4), 1.0), torch.full((6, 4), 2.0)], dim=-1))
        assert shm_calls == 1  # the gather's contiguous copy fits; the big all-reduce did not take the segment


def group_has_shm(tp: Any, dist: Any) -> bool:
    return tp.shm is not None


def test_turned_off_by_the_environment() -> None:
    assert run_ranks(2, group_has_shm, env={shm_allreduce.CAPACITY_ENV: "0"}) == [False, False]


def refused_by_one_rank(tp: Any, dist: Any) -> tuple[bool, bool, bool]:
    """join again with rank 1 unable to open the segment (as on another host): nobody uses one,
    and rank 0 has unlinked the segment's file all the same."""
    made: list[str] = []
    original_open, original_create = shm_allreduce.open_segment, shm_allreduce.create_segment

    def create(*args: Any) -> Any:
        made.append((segment := original_create(*args))[0])
        return segment

    shm_allreduce.create_segment = create
    if tp.rank == 1:
        shm_allreduce.open_segment = lambda *args: None
    try:
        joined = shm_allreduce.join(tp.group, tp.rank, tp.size, 30.0, capacity=4096)
    finally:
        shm_allreduce.open_segment, shm_allreduce.create_segment = original_open, original_create
    tp_without = type(tp)(rank=tp.rank, size=tp.size, group=tp.group, shm=joined)
    summed = torch.equal(tp_without.all_reduce(torch.ones(3)), torch.full((3,), 2.0))
    return joined is None, summed, any(os.path.exists(path) for path in made)


def test_a_rank_that_cannot_map_the_segment_turns_it_off_for_all() -> None:
    assert run_ranks(2, refused_by_one_rank) == [(True, True, False), (True, True, False)]


def test_a_missing_rank_times_out_naming_it() -> None:
    path, token, buffer = shm_allreduce.create_segment(3, 1024)
    os.unlink(path)
    comm = ShmCommunicator(0, 3, buffer, 1024, timeout_s=0.2)
    comm._flags[comm._flag_index[2]] = 10  # rank 2 is ahead; rank 1 never comes
    start = time.monotonic()
    with pytest.raises(CollectiveTimeout, match=r"rank 0 of 3 .* rank\(s\) \[1\] did not arrive"):
        comm.all_reduce(torch.ones(4))
    assert time.monotonic() - start < 5
    comm.close()


def test_a_rank_whose_process_ended_is_named_before_the_timeout() -> None:
    path, token, buffer = shm_allreduce.create_segment(2, 1024)
    os.unlink(path)
    gone = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0,))
    gone.start()
    gone.join()
    comm = ShmCommunicator(0, 2, buffer, 1024, timeout_s=60.0)
    comm._flags[comm._flag_index[1] + 1] = gone.pid  # rank 1's process, ended
    comm.watch_pids = True
    start = time.monotonic()
    with pytest.raises(PeerExited, match=rf"rank 0 of 2: rank 1 \(pid {gone.pid}\) exited"):
        comm.all_reduce(torch.ones(4))
    assert time.monotonic() - start < 5
    comm.close()


def test_open_segment_checks_the_token_and_the_size() -> None:
    path, token, buffer = shm_allreduce.create_segment(2, 1024)
    try:
        other = shm_allreduce.open_segment(path, token, 2, 1024)
        assert other is not None
        assert shm_allreduce.open_segment(path, b"not the token....", 2, 1024) is None
        assert shm_allreduce.open_segment(path, token, 3, 1024) is None  # another group's size
        other.close()
    finally:
        os.unlink(path)
    assert shm_allreduce.open_segment(path, token, 2, 1024) is None
    buffer.close()
