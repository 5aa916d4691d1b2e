"""engine/: request state, block manager, scheduler, runner, sampler, detokenizer, LLMEngine, AsyncEngine."""
