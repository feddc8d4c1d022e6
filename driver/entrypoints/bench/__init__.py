"""`shardlm bench`: throughput, latency, load, prefix caching and start-up, each beside a
reference measured in the same run (transformers, or the machine's own limit)."""
