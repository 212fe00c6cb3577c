"""Publishing to RabbitMQ: the outbox relay (events and replies committed with their change) and direct
publishing from a consumer thread (query replies, error replies, retry copies, dead letters)."""
