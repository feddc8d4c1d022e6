"""Run by test_two_nodes.py in a fresh process: a two-node Ray cluster on this host (one CPU
each, different memory), one rank per node. Prints what the test checks, as JSON."""

from __future__ import annotations

import json
import os
import sys

import torch
from ray.cluster_utils import Cluster

GIB = 2**30


def main(folder: str) -> None:
    import ray
    from transformers import AutoModelForCausalLM

    from driver import LLM
    from workers.kv_cache import kv_block_bytes

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "memory": 2 * GIB, "include_dashboard": False})
    cluster.add_node(num_cpus=1, memory=1 * GIB)
    cluster.wait_for_nodes()
    os.environ["RAY_ADDRESS"] = cluster.address  # LLM joins the cluster RAY_ADDRESS names
    try:
        prompts = [[1, 17, 42, 99, 5], [2, 200, 3, 8]]
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            refs = [hf(torch.tensor([p])).logits[0] for p in prompts]
        with LLM(folder, tensor_parallel_size=2, max_num_batched_tokens=256, device="cpu", skip_tokenizer_init=True) as llm:
            ours = llm.prompt_logits(prompts)
            report = llm.load_report
            print(
                json.dumps(
                    {
                        "max_diff": max(float((a - b).abs().max()) for a, b in zip(ours, refs)),
                        "nodes": report.nodes,
                        "offered": [p.kv_cache_bytes for p in report.memory],
                        "num_blocks": report.num_blocks,
                        "block_bytes": kv_block_bytes(llm.config, 2),
                    }
                )
            )
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
