"""One LLM client protocol over several backends (OpenAI-compatible servers, local transformers, vLLM offline).

Knows nothing of the store: its response cache and usage log are objects handed to `LLMClient`.
"""
