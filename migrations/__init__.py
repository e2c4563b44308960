"""Alembic migrations for the routelens database (SQLite and PostgreSQL).

Run them with `routelens db upgrade --db URL`; `collector.store.db` builds the
Alembic configuration, so no alembic.ini is needed.
"""
