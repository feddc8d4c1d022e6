"""How people reach the engine: `LLM`, the `shardlm` command, Ray Serve with OpenAI's routes, the
async engine behind Serve, the planner, `shardlm download` and the benches. Each is a thin client
of `driver.engine`."""
