"""Publishing to RabbitMQ: the outbox relay (events committed with their change) and publishing from a consumer
thread (every reply, once its batch is committed; retry copies, dead letters)."""
