"""Persistence: SQLAlchemy 2 async over SQLite (embedded) or PostgreSQL, Alembic migrations."""
