"""The chat layer: a protocol-neutral chat request, its prompt, and its generation (parsing, forced calls, JSON output)."""
