"""One router per resource: steering vectors, the OpenAI-compatible front, health and metrics."""
