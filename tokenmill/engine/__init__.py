"""The engine: requests and tokens. It knows nothing of HTTP, keys or money."""
