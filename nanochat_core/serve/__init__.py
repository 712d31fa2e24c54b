"""Serving above the ML core: the chat server (web UI + OpenAI-compatible API), continuous batching, request
parsing and the terminal chat. `python -m nanochat_core.serve` runs the server.

Nothing in the ML core imports this package, so no serving code is part of a stage's identity.
"""
