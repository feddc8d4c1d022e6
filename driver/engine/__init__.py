"""The engine: the core (scheduler, block manager, the step; no tokenizer), the processor that
turns prompts into its requests, the output processor that turns its token ids into
`RequestOutput`s, and the driver actor (`actor.Engine`) that starts the ranks and runs them."""
