"""The OpenAI-compatible HTTP server: `build_app(engine, settings)` and its parts."""
