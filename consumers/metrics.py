"""What the message loop tells about itself, for metrics. The loop calls these hooks; the composition root
(`service.app`) passes an implementation that feeds Prometheus (`service.metrics`), so that consumers/ knows
nothing of it. The default does nothing."""
from __future__ import annotations


class LoopMetrics:
    """Called from consumer threads; an implementation must be thread-safe and cheap (it runs per message)."""

    def settled(self, queue: str, message_type: str, outcome: str, seconds: float) -> None:
        """A message was settled (`outcome`: OK, a reply code, RETRY, WAITING, DUPLICATE, REQUEUED, REJECTED)."""

    def dead_lettered(self, dlq: str, code: str) -> None:
        """A message went to `dlq` with error code `code` (REJECTED: the broker dead-lettered it)."""

    def batch(self, queue: str, size: int) -> None:
        """A batch of `size` deliveries was handled."""

    def transaction_retry(self, queue: str, reason: str) -> None:
        """A batch's transaction ran again (`reason`: fallback to a savepoint per message, or transient)."""

    def reconnect(self, queue: str) -> None:
        """A consumer lost its session and will connect again."""

    def replies_refused(self, queue: str, count: int) -> None:
        """Requesters' queues refused `count` replies (e.g. full, `x-overflow: reject-publish`): those are lost."""


NO_METRICS = LoopMetrics()

__all__ = ["NO_METRICS", "LoopMetrics"]
