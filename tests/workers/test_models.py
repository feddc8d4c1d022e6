"""shardlm's model at one rank against transformers: logits within 1e-4 in float32 on CPU."""

from __future__ import annotations

import pytest
import torch

from driver.config.args import EngineArgs
from tests.helpers import reference_logits
from workers.safetensors_file import read_header
from workers.worker import Worker

PROMPTS = [[1, 17, 42, 99, 5, 250, 299, 3, 64, 128, 7], [2, 200], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 12, 13, 14, 15, 16, 17]]
TOLERANCE = 1e-4
"""Both sides compute in float32 with the same operation order up to matmul blocking: differences
are a few ulps of logits of magnitude ~1."""


def load(folder, **kwargs) -> tuple[Worker, object]:
    worker = Worker(EngineArgs(model=str(folder), device="cpu", **kwargs).create_engine_config())
    return worker, worker.load_model()


CASES = [
    ("llama", "safetensors"),
    ("llama", "sharded"),
    ("llama", "bin"),
    ("llama", "sharded_bin"),
    ("llama_tied", "safetensors"),
    ("llama_tied", "bin"),
    ("llama_bias", "safetensors"),
    ("llama3_rope", "safetensors"),
    ("llama_linear_rope", "safetensors"),
    ("mistral", "safetensors"),
    ("mistral", "sharded"),
    ("qwen2", "safetensors"),
    ("qwen2_untied", "sharded"),
]


@pytest.mark.parametrize("family,fmt", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_logits_match_transformers(tiny_checkpoint, family: str, fmt: str) -> None:
    folder, hf = tiny_checkpoint(family, fmt)
    worker, report = load(folder)
    ours = worker.prompt_logits(PROMPTS)
    for prompt, mine, ref in zip(PROMPTS, ours, reference_logits(hf, PROMPTS)):
        assert mine.shape == ref.shape == (len(prompt), hf.config.vocab_size)
        torch.testing.assert_close(mine, ref, atol=TOLERANCE, rtol=0)
    assert report.bytes_read == report.checkpoint_bytes, "one rank reads every tensor byte exactly once"


def test_sharded_checkpoint_is_read_from_every_shard(tiny_checkpoint) -> None:
    folder, _ = tiny_checkpoint("llama", "sharded")
    worker, report = load(folder)
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 2
    assert worker.config.load.weight_files == tuple(shards)
    in_files = sum(len(read_header(str(folder / shard))[1]) for shard in shards)
    assert report.tensors_read == in_files


def test_tied_embeddings_share_one_parameter(tiny_checkpoint) -> None:
    worker, _ = load(tiny_checkpoint("llama_tied", "safetensors")[0])
    assert worker.model.lm_head.weight is worker.model.model.embed_tokens.weight
    untied, _ = load(tiny_checkpoint("llama", "safetensors")[0])
    assert untied.model.lm_head.weight is not untied.model.model.embed_tokens.weight


def test_bfloat16_checkpoint_converts_on_load(tiny_checkpoint, tmp_path) -> None:
    _, hf = tiny_checkpoint("llama", "safetensors")
    hf16 = type(hf)(hf.config).to(torch.bfloat16)
    hf16.load_state_dict(hf.state_dict())
    hf16.save_pretrained(tmp_path)
    worker, report = load(tmp_path, dtype="float32")
    assert worker.model.model.embed_tokens.weight.dtype == torch.float32
    assert report.bytes_read == report.checkpoint_bytes
    ref = reference_logits(hf16.float(), PROMPTS[:1])[0]
    torch.testing.assert_close(worker.prompt_logits(PROMPTS[:1])[0], ref, atol=TOLERANCE, rtol=0)


def test_dummy_weights_read_nothing_and_are_deterministic(tiny_checkpoint) -> None:
    folder, _ = tiny_checkpoint("llama", "safetensors")
    first, report = load(folder, load_format="dummy", seed=3)
    second, _ = load(folder, load_format="dummy", seed=3)
    other, _ = load(folder, load_format="dummy", seed=4)
    assert report.bytes_read == 0 and report.load_format == "dummy"
    a, b, c = (w.prompt_logits(PROMPTS[:1])[0] for w in (first, second, other))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
