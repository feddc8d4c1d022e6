"""The real model, SmolLM2-135M-Instruct, at one rank: from its GGUF file and from a safetensors
folder converted from it, against transformers' reading of the same GGUF file (float32, CPU)."""

from __future__ import annotations

import pytest
import torch

from driver.config.args import EngineArgs
from driver.entrypoints.loading import load_in_process
from tests.helpers import reference_logits

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n",
]
TOLERANCE = 1e-4
RELATIVE = 1e-5
"""float32 rounding: the rank multiplies its larger weights through oneDNN (`kernels.onednn_linear`),
whose sums run in another order than transformers' MKL (relative differences up to about 6e-6)."""


@pytest.fixture(scope="module", params=["gguf", "safetensors"])
def loaded(request, smollm2_gguf, smollm2_reference):
    model = str(smollm2_gguf) if request.param == "gguf" else str(smollm2_reference[0])
    return load_in_process(EngineArgs(model=model, device="cpu"))


def test_logits_match_transformers(loaded, smollm2_reference) -> None:
    hf = smollm2_reference[1]
    prompts = [loaded.tokenizer(p)["input_ids"] for p in PROMPTS]
    ours = loaded.worker.prompt_logits(prompts)
    for mine, ref in zip(ours, reference_logits(hf, prompts)):
        torch.testing.assert_close(mine, ref, atol=TOLERANCE, rtol=RELATIVE)


def test_greedy_text_matches_transformers(loaded, smollm2_reference) -> None:
    hf = smollm2_reference[1]
    tokenizer = loaded.tokenizer
    for prompt in PROMPTS[:2]:
        ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids) :].tolist()
        ours = loaded.worker.greedy_continuation(ids, 12)
        assert tokenizer.decode(ours) == tokenizer.decode(ref)
        assert ours == ref


def test_every_tensor_byte_is_read_once(loaded) -> None:
    report = loaded.report.ranks[0]
    assert report.bytes_read == report.checkpoint_bytes
    assert report.weight_device_bytes > 0 and report.peak_host_bytes >= report.weight_device_bytes
    assert set(loaded.report.phases) == {"discover", "weights", "tokenizer"}


def test_packed_linears_give_the_tokens_of_f_linear(loaded) -> None:
    """The oneDNN-packed weights against the path they replace, `F.linear` on the parameters:
    the same greedy tokens, logits within float32 rounding."""
    from kernels.onednn_linear import PACKED_ATTR
    from workers.packed_weights import pack_linear_weights, unpack_linear_weights

    worker = loaded.worker
    assert worker.model.lm_head.__dict__.get(PACKED_ATTR) is not None  # the default packs on CPU
    prompts = [loaded.tokenizer(p)["input_ids"] for p in PROMPTS]
    packed_logits = worker.prompt_logits(prompts)
    packed_tokens = [worker.greedy_continuation(ids, 12) for ids in prompts[:2]]
    unpack_linear_weights(worker.model)
    try:
        plain_logits = worker.prompt_logits(prompts)
        assert [worker.greedy_continuation(ids, 12) for ids in prompts[:2]] == packed_tokens
    finally:
        assert pack_linear_weights(worker.model) > 0
    for a, b in zip(packed_logits, plain_logits):
        torch.testing.assert_close(a, b, atol=TOLERANCE, rtol=RELATIVE)
