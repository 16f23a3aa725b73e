"""The feature database: SQLModel tables, engine, queries. Knows nothing of torch or LLMs."""

from autointerp.store.engine import DEFAULT_DB_URL, StoreError, open_store
from autointerp.store.tables import SCHEMA_VERSION

__all__ = ["DEFAULT_DB_URL", "SCHEMA_VERSION", "StoreError", "open_store"]
