"""The OpenAI-compatible HTTP server: routes, protocol models, and the harmony bridge."""
