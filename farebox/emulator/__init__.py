"""A local stand-in for the OpenAI, Anthropic and Gemini HTTP APIs, with fault and latency knobs."""
