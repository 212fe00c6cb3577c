"""One handler module per message family, and the loop that owns acks, retries, the inbox and the outbox."""
