"""The certificate lifecycle as pure Python: no I/O, no SQLAlchemy, no pika."""
