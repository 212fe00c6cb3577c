"""PostgreSQL storage behind the domain's ports (SQLAlchemy Core + psycopg 3).

Core rather than ORM: the handlers already have their own aggregate (`domain.model.Certificate`), so an identity
map and change tracking would only cost time. Import the pieces from their modules (`storage.engine`,
`storage.uow`, `storage.outbox`, `storage.migrate`, `storage.errors`); this package imports nothing eagerly so
that the domain's unit tests never pay for SQLAlchemy.
"""
