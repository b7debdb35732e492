"""Alembic migrations of the store, run by `open_store` (`script_location` is set from code)."""
