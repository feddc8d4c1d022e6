"""A random-weight checkpoint of Llama-3.2-1B's shape in bfloat16 (2.5 GB), for `bench load` on a GPU machine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

CONFIG = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    vocab_size=128256,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    tie_word_embeddings=True,
    torch_dtype="bfloat16",
    hidden_act="silu",
)


def tensors() -> dict[str, torch.Tensor]:
    h, i, kv = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["num_key_value_heads"] * CONFIG["head_dim"]
    shapes = {"model.embed_tokens.weight": (CONFIG["vocab_size"], h), "model.norm.weight": (h,)}
    for layer in range(CONFIG["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {k: (torch.randn(s, device=device, dtype=torch.bfloat16) * 0.02).cpu() for k, s in shapes.items()}


def main(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    weights = tensors()
    names = sorted(weights)
    half = len(names) // 2
    for part, chunk in enumerate((names[:half], names[half:])):
        save_file({k: weights[k] for k in chunk}, str(folder / f"model-0000{part + 1}-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {k: f"model-0000{1 + (n >= half)}-of-00002.safetensors" for n, k in enumerate(names)}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    print(sum(t.numel() * t.element_size() for t in weights.values()) / 1e9, "GB")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
