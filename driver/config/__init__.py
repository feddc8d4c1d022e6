"""What the user asks for (`args.EngineArgs`, vLLM's names) and how it is resolved against the
model: the maximum length, sampling defaults from generation_config.json, memory sizes."""
