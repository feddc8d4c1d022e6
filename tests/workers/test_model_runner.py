"""A rank's step on CPU: the inputs built in one buffer, the fused rotary and KV writes, and whole
steps over the paged cache against the model run without one."""

from __future__ import annotations

import random

import msgspec
import torch

from driver import EngineArgs
from kernels.reshape_and_cache import reshape_and_cache_ref
from workers.batch import Batch, NewSequence, TableUpdate
from workers.config import RopeScaling
from workers.models.layers import Attention, PagedMetadata, RotaryEmbedding, apply_rotary_
from workers.sampling_params import SamplingParams
from workers.worker import Worker

GREEDY = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)


def tiny_worker(tiny_checkpoint, blocks: int = 64) -> Worker:
    worker = Worker(EngineArgs(model=str(tiny_checkpoint("llama")[0]), device="cpu", max_model_len=256).create_engine_config())
    worker.load_model()
    worker.allocate_kv_cache(blocks)
    return worker


def batch(seq_ids, token_ids, query_lens, context_lens, num_decodes, **kwargs) -> Batch:
    return Batch(
        seq_ids=seq_ids,
        token_ids=token_ids,
        query_lens=query_lens,
        context_lens=context_lens,
        num_decodes=num_decodes,
        sample=[True] * len(seq_ids),
        prompt_logprob_counts=[0] * len(seq_ids),
        **kwargs,
    )


def test_prepare_builds_positions_slots_and_tables(tiny_checkpoint) -> None:
    """Two decodes, a whole prompt and a chunk after 5 cached tokens, through tables that are not
    in order: each token's position and slot, and the kernels' int32 metadata."""
    runner = tiny_worker(tiny_checkpoint).runner
    bs = runner.block_size
    tables = {1: [7, 3], 2: [9], 3: [4, 12], 4: [5]}
    runner.tables.apply([TableUpdate(s, 0, b) for s, b in tables.items()], [])
    step = batch([1, 2, 3, 4], list(range(100, 100 + 2 + 20 + 3)), [1, 1, 20, 3], [bs + 2, 4, 20, 8], 2)
    ids, positions, meta = runner.prepare(step)
    expected_positions = [bs + 1, 3] + list(range(20)) + [5, 6, 7]
    seq_of = [1, 2] + [3] * 20 + [4] * 3
    assert ids.tolist() == step.token_ids and ids.dtype == torch.int64
    assert positions.tolist() == expected_positions
    assert meta.slot_mapping.tolist() == [tables[s][p // bs] * bs + p % bs for s, p in zip(seq_of, expected_positions)]
    assert meta.slot_mapping.dtype == torch.int64 and meta.decode_block_tables.dtype == torch.int32
    assert meta.decode_block_tables.tolist() == [[7, 3], [9, 0]] and meta.prefill_block_tables.tolist() == [[4, 12], [5, 0]]
    assert meta.decode_context_lens.tolist() == [bs + 2, 4] and meta.prefill_context_lens.tolist() == [20, 8]
    assert meta.prefill_query_start.tolist() == [0, 20, 23] and meta.max_prefill_query_len == 20
    assert meta.prefill_spans == ((0, 20, 20), (20, 23, 8))
    assert meta.decode_blocks.blocks.tolist() == [7, 3, 9, 0]


def test_few_decodes_build_what_the_general_build_does(tiny_checkpoint) -> None:
    """A CPU step of up to FEW_DECODES decodes builds its inputs from lists: the very tensors of
    the numpy build that its torch path reads, for one and several decodes, equal and unequal
    lengths, tables longer than their contexts, with and without a pool pair."""
    from workers.model_runner import FEW_DECODES

    runner = tiny_worker(tiny_checkpoint).runner
    bs, rng = runner.block_size, random.Random(3)
    for case in range(40):
        runner.pair_blocks = 0 if case % 4 == 3 else 64
        count = rng.randint(1, FEW_DECODES)
        lens = [rng.randint(1, 5 * bs) for _ in range(count)] if case % 3 else [rng.randint(1, 5 * bs)] * count
        tables = [[rng.randrange(1, 64) for _ in range(-(-n // bs) + rng.randint(0, 2))] for n in lens]
        seq_ids = [100 * case + i for i in range(count)]
        runner.tables.apply([TableUpdate(s, 0, t) for s, t in zip(seq_ids, tables)], [])
        step = batch(seq_ids, [rng.randrange(256) for _ in lens], [1] * count, lens, count)
        fast, general = runner.prepare_few_decodes(step), runner.prepare_any(step)
        for a, b in zip(fast[:2], general[:2]):
            assert torch.equal(a, b)
        m, g = fast[2], general[2]
        assert torch.equal(m.slot_mapping, g.slot_mapping), case
        assert m.decode_block_tables is m.decode_context_lens is m.prefill_block_tables is None  # the kernels' inputs
        assert m.num_decodes == g.num_decodes and m.max_prefill_query_len == g.max_prefill_query_len == 0
        p, q = m.decode_blocks, g.decode_blocks
        assert torch.equal(p.blocks, q.blocks) and torch.equal(p.tail, q.tail) and p.length == q.length, case
        assert (p.visible is None) == (q.visible is None) and (p.visible is None or torch.equal(p.visible, q.visible))
        assert (p.pair_rows is None) == (q.pair_rows is None) and p.pair_blocks == q.pair_blocks
        assert p.pair_rows is None or torch.equal(p.pair_rows, q.pair_rows)
        runner.tables.apply([], seq_ids)


def test_rotary_in_place_is_rotate_half() -> None:
    """x cos + rotate_half(x) sin, as transformers computes it, bit for bit, on a strided view."""
    rope = RotaryEmbedding(16, 10000.0, RopeScaling(), 64)
    rope.init_buffers()
    positions = torch.tensor([0, 5, 63])
    fused = torch.randn(3, 7 * 16)
    x = fused.view(3, 7, 16)[:, :5]
    angles = positions[:, None].float() * (1.0 / 10000.0 ** (torch.arange(0, 16, 2).float() / 16))[None, :]
    cos, sin = torch.cat([angles, angles], -1).cos()[:, None], torch.cat([angles, angles], -1).sin()[:, None]
    expected = x * cos + torch.cat([-x[..., 8:], x[..., :8]], -1) * sin
    apply_rotary_(x, rope(positions, torch.float32))
    assert torch.equal(x, expected)


def test_one_write_for_keys_and_values(monkeypatch) -> None:
    """k and v of one fused output go to the pair of pools in one index_copy_ (not the reference's
    two), as the reference writes them."""
    attn = Attention(0.25)
    pair = torch.zeros(2, 5, 4, 2, 8)
    attn.kv_cache, attn.kv_pair = (pair[0], pair[1]), pair
    heads = torch.randn(3, 4 + 2 + 2, 8)
    kv = heads[:, 4:].unflatten(1, (2, 2))
    slots = torch.tensor([3, 17, 8])
    expected_k, expected_v = pair[0].clone(), pair[1].clone()
    reshape_and_cache_ref(kv[:, 0], kv[:, 1], expected_k, expected_v, slots)
    meta = PagedMetadata(
        slot_mapping=slots,
        num_decodes=0,
        decode_block_tables=torch.zeros(0, 1, dtype=torch.int32),
        decode_context_lens=torch.zeros(0, dtype=torch.int32),
        prefill_block_tables=torch.tensor([[1]], dtype=torch.int32),
        prefill_query_start=torch.tensor([0, 3], dtype=torch.int32),
        prefill_context_lens=torch.tensor([3], dtype=torch.int32),
        max_prefill_query_len=3,
        prefill_spans=((0, 3, 3),),
    )
    monkeypatch.setattr("kernels.reshape_and_cache.reshape_and_cache_ref", None)
    attn(heads[:, :4], kv[:, 0], kv[:, 1], meta, kv=kv)
    assert torch.equal(pair[0], expected_k) and torch.equal(pair[1], expected_v)


def test_paged_steps_match_the_model_without_a_cache(tiny_checkpoint) -> None:
    """Prompts prefilled (one of them in two chunks) and then decoded together, blocks handed out
    in shuffled order: the greedy tokens of recomputing each whole sequence without a cache."""
    worker = tiny_worker(tiny_checkpoint)
    runner, bs = worker.runner, worker.runner.block_size
    rng = random.Random(0)
    free = list(range(1, 65))
    rng.shuffle(free)
    prompts = [[rng.randrange(300) for _ in range(n)] for n in (5, 23, 40)]
    new_tokens = 12
    blocks = [[free.pop() for _ in range(-(-(len(p) + new_tokens) // bs))] for p in prompts]
    new = [NewSequence(seq_id=i, prompt_token_ids=p, params=GREEDY, seed=None, stop_ids=[]) for i, p in enumerate(prompts)]
    updates = [TableUpdate(i, 0, b) for i, b in enumerate(blocks)]
    first = prompts[2][:17]
    step = batch([0, 1, 2], prompts[0] + prompts[1] + first, [5, 23, 17], [5, 23, 17], 0, new_seqs=new, table_updates=updates)
    step = msgspec.structs.replace(step, sample=[True, True, False])  # the chunked prompt samples after its last chunk
    sampled = {s.seq_id: [s.token_id] for s in runner.execute(step).sampled}
    rest = prompts[2][17:]
    step = batch([0, 1, 2], [sampled[0][-1], sampled[1][-1]] + rest, [1, 1, len(rest)], [6, 24, 40], 2)
    for s in runner.execute(step).sampled:
        sampled.setdefault(s.seq_id, []).append(s.token_id)
    while len(sampled[0]) < new_tokens:
        lens = [len(p) + len(sampled[i]) for i, p in enumerate(prompts)]
        step = batch([0, 1, 2], [sampled[i][-1] for i in range(3)], [1, 1, 1], lens, 3)
        for s in runner.execute(step).sampled:
            sampled[s.seq_id].append(s.token_id)
    for i, prompt in enumerate(prompts):
        assert sampled[i] == worker.greedy_continuation(prompt, len(sampled[i])), f"sequence {i}"


def test_a_small_step_runs_on_one_thread_and_the_count_comes_back(tiny_checkpoint, monkeypatch) -> None:
    """The tiny model's step is far below MIN_SPLIT_MACS: it runs on one torch thread, and the
    rank's count is restored after it; a step above the bound keeps the rank's count."""
    import workers.step_threads as step_threads

    runner = tiny_worker(tiny_checkpoint).runner
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    seen = []
    real = runner._execute
    monkeypatch.setattr(runner, "_execute", lambda b: seen.append(torch.get_num_threads()) or real(b))
    try:
        runner.tables.apply([TableUpdate(1, 0, [3])], [])
        step = batch(
            [1],
            [5, 6, 7],
            [3],
            [3],
            0,
            new_seqs=[NewSequence(seq_id=1, prompt_token_ids=[5, 6, 7], params=GREEDY, seed=None, stop_ids=[])],
        )
        runner.execute(step)
        assert seen == [1] and torch.get_num_threads() == 2
        monkeypatch.setattr(step_threads, "MIN_SPLIT_MACS", 1)
        runner.execute(batch([1], [8], [1], [4], 1))
        assert seen == [1, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
