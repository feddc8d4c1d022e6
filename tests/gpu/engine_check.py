"""The whole engine on a CUDA GPU, against transformers on the same GPU (run by .ci/gpu-check.sh;
not part of the CPU suite).

A random-weight Llama of SmolLM2-135M's shape is written as a bfloat16 safetensors folder (the
real SmolLM2 file is too big to carry to the GPU machine), then:
- logits of shardlm (bfloat16 and float32) against transformers in the same dtype;
- greedy text through the paged engine (Triton prefill, decode and cache kernels) against
  transformers' greedy `generate`;
- FP8 weights (torch._scaled_mm) with an FP8 KV cache, int8 weights, and a GPTQ 4-bit checkpoint
  of the same model (written by tests/quant_packer.py), against transformers on the
  dequantized weights where the weights are exactly known (GPTQ) and as agreement otherwise.

Usage: python tests/gpu/engine_check.py OUT_DIR [--tiny]   (--tiny: a small model, for a CPU dry run;
ENGINE_ONLY=bfloat16,gptq runs only the checks whose names start so)
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

PROMPTS = [[1, 17, 42, 99, 5, 250, 299, 3, 64, 128, 7] * 3, [2, 200], list(range(300, 400))]


def model_config(tiny: bool):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=2,
            vocab_size=512,
            tie_word_embeddings=True,
        )
    return LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    )


def write_model(folder: Path, tiny: bool):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config(tiny)).eval()
    model.config.architectures = ["LlamaForCausalLM"]
    model.to(torch.bfloat16).save_pretrained(folder)
    return model


def hf_logits(model, device: str, dtype: torch.dtype) -> list[torch.Tensor]:
    model = model.to(device=device, dtype=dtype)
    with torch.no_grad():
        return [model(torch.tensor([p], device=device)).logits[0].float().cpu() for p in PROMPTS]


def hf_greedy(model, device: str, dtype: torch.dtype, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    model = model.to(device=device, dtype=dtype)
    model.generation_config.eos_token_id = None  # no early stop, as the engine's ignore_eos
    with torch.no_grad():
        return [
            model.generate(torch.tensor([p], device=device), max_new_tokens=tokens, do_sample=False, pad_token_id=0)[
                0, len(p) :
            ].tolist()
            for p in prompts
        ]


def compare(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> dict[str, float]:
    diff = max(float((a - b).abs().max()) for a, b in zip(ours, ref))
    scale = max(float(b.abs().max()) for b in ref)
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(ours, ref)) / sum(len(b) for b in ref)
    return {"max_abs_diff": diff, "max_abs_logit": scale, "argmax_agreement": agree}


def engine_run(folder: Path, device: str, prompts, tokens: int, **kwargs) -> dict:
    from driver import LLM
    from workers.sampling_params import SamplingParams

    start = time.perf_counter()
    with LLM(str(folder), skip_tokenizer_init=True, device=device, max_model_len=512, **kwargs) as llm:
        started = time.perf_counter() - start
        logits = llm.prompt_logits(PROMPTS)
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        report = llm.load_report
    return {
        "start_s": started,
        "logits": logits,
        "greedy": [list(o.outputs[0].token_ids) for o in outputs],
        "weight_bytes": report.ranks[0].weight_device_bytes,
        "kv_blocks": report.num_blocks,
        "phases": report.phases,
    }


def same_prefix(ours: list[list[int]], ref: list[list[int]]) -> list[int]:
    return [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(y)) for x, y in zip(ours, ref)]


def main(out: Path, tiny: bool) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = Path("/tmp/shardlm-gpu-check/model")
    hf = write_model(folder, tiny)
    greedy_prompts = [p[:24] for p in PROMPTS] + [[7, 8, 9, 10] * 4]
    results: dict[str, object] = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}

    only = [c for c in os.environ.get("ENGINE_ONLY", "").split(",") if c]

    def check(name: str, ref_dtype: torch.dtype, ref_model=None, **kwargs) -> None:
        if only and not any(name.startswith(c) for c in only):
            return
        try:
            ref_model = ref_model or hf
            run = engine_run(folder if "model" not in kwargs else Path(kwargs.pop("model")), device, greedy_prompts, 24, **kwargs)
            ref_greedy = hf_greedy(ref_model, device, ref_dtype, greedy_prompts, 24)
            results[name] = {
                **compare(run["logits"], hf_logits(ref_model, device, ref_dtype)),
                "greedy_same_prefix": same_prefix(run["greedy"], ref_greedy),
                "start_s": run["start_s"],
                "weight_bytes": run["weight_bytes"],
                "kv_blocks": run["kv_blocks"],
                "phases": run["phases"],
            }
        except Exception:
            results[name] = {"error": traceback.format_exc()}
        print(name, json.dumps(results[name], indent=1), flush=True)
        (out / "engine_check.json").write_text(json.dumps(results, indent=1))

    check("bfloat16", torch.bfloat16, dtype="bfloat16")
    check("float32", torch.float32, dtype="float32")
    check("fp8_weights_fp8_kv", torch.bfloat16, dtype="bfloat16", quantization="fp8", kv_cache_dtype="fp8")
    check("int8_weights", torch.bfloat16, dtype="bfloat16", quantization="int8")
    if only and not any("gptq_4bit_act_order".startswith(c) for c in only):
        return
    try:
        from tests.quant_packer import Scheme, write_quantized_checkpoint

        gptq = Path("/tmp/shardlm-gpu-check/gptq")
        dequantized = write_quantized_checkpoint(
            hf.float().cpu(), gptq, Scheme("gptq", 128 if not tiny else 64, sym=False, desc_act=True)
        )
        check("gptq_4bit_act_order", torch.bfloat16, ref_model=dequantized, dtype="bfloat16", model=str(gptq))
    except Exception:
        results["gptq_4bit_act_order"] = {"error": traceback.format_exc()}
    (out / "engine_check.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), "--tiny" in sys.argv)
