"""The inference engine: gpt-oss over a paged KV cache, the scheduler and the async engine.

It speaks token ids only: no text, no HTTP. (Built in the engine issues.)
"""
