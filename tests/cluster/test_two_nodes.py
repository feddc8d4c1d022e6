"""Two Ray nodes on one host, one rank on each: the same logits, and the poorer node sets the pool."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

GIB = 2**30


def test_one_rank_per_node(tiny_checkpoint) -> None:
    folder, _ = tiny_checkpoint("llama_8h4kv")
    script = Path(__file__).with_name("two_nodes.py")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]))
    done = subprocess.run([sys.executable, str(script), str(folder)], capture_output=True, text=True, timeout=400, env=env)
    assert done.returncode == 0, done.stderr[-5000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["max_diff"] <= 1e-4
    assert len(set(result["nodes"])) == 2, "each rank on its own node"
    offered = result["offered"]
    assert offered[0] != offered[1], "the nodes declare different memory"
    assert min(offered) <= 0.25 * GIB
    assert result["num_blocks"] == min(offered) // result["block_bytes"] - 1  # less the null block
