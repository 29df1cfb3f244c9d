"""The gpt-oss model: its weights in both checkpoint layouts and the forward over a paged KV cache."""
