"""The validator's OpenAI-compatible gateway: HTTP in front of the miner pool, API keys and per-key limits."""
