"""The OpenAI-facing side: an OpenAI-compatible server, the LLM-as-judge and golden-answer clients."""
