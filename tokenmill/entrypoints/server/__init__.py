"""The HTTP server shared by the OpenAI and Anthropic APIs: app factory, guards, errors, metrics."""
