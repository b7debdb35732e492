"""The model catalog: ids, families, chat templates, prices and sources of served models."""
