"""The platform layer: who is calling (keys), what they may do (limits, budgets) and what it cost
(the usage ledger), kept in a SQL store. Everything here is synchronous database work: the server
calls it through `asyncio.to_thread`, never on the event loop or the engine's step thread."""
