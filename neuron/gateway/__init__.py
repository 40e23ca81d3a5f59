"""The validator's OpenAI-compatible front door: API keys, user requests routed to verified miners."""
