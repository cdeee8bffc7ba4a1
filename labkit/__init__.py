"""labkit: measure how an LLM served the simple way uses a GPU."""
