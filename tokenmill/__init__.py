"""tokenmill: a self-hosted LLM inference platform."""
