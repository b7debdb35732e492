"""Alembic environment: migrations run on the connection `open_store` passes in
`config.attributes["connection"]`, inside the transaction it holds (so concurrent first starts
serialize on it), never from a URL of their own."""

from __future__ import annotations

from alembic import context

from tokenmill.platform.db import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
