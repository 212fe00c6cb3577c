"""`intygstjanst dlq ...`: look at, replay and purge the dead-letter queues (CONTRACT §8).

The broker comes from `AMQP_URL` (see `service.settings`). QUEUE is a service queue or its DLQ:
`intyg.status` and `intyg.status.dlq` mean the same.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pika
import typer
from pika.exceptions import AMQPError, ChannelClosedByBroker
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from publishers import dlq as ops
from service.settings import Settings

dlq_app = typer.Typer(
    name="dlq",
    help="Dead-letter queues: list them, show their messages, replay them to intyg.commands, purge them.\n\n"
         "QUEUE is a service queue or its DLQ (intyg.status = intyg.status.dlq). The broker is AMQP_URL.\n\n"
         "Browsing is not free: every message looked at and left in place is requeued (its redelivered flag is "
         "set, and on a quorum queue it counts as a delivery).",
    no_args_is_help=True,
)
console = Console()
errors = Console(stderr=True)

IdOption = typer.Option(None, "--id", help="message_id of a dead letter; repeat for several.", show_default=False)


@contextmanager
def _channel() -> Iterator[Any]:
    url = Settings().amqp_url
    try:
        connection = pika.BlockingConnection(pika.URLParameters(url))
    except AMQPError as exc:
        errors.print(f"[red]cannot connect to the broker:[/red] {exc.__class__.__name__} {exc}")
        raise typer.Exit(2) from None
    try:
        yield connection.channel()
    except ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            errors.print(f"[red]no such queue[/red] ({exc.reply_text}); run `intygstjanst topology` first?")
            raise typer.Exit(2) from None
        raise
    finally:
        if connection.is_open:
            connection.close()


def _queue(name: str) -> str:
    try:
        return ops.resolve_queue(name)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="QUEUE") from None


def _selection(ids: list[str] | None, all_: bool, verb: str) -> set[str] | None:
    if ids and all_:
        raise typer.BadParameter("give either --id ... or --all, not both")
    if not ids and not all_:
        errors.print(f"[red]refusing to {verb} nothing in particular:[/red] give --id MESSAGE_ID (repeatable) "
                     f"or --all")
        raise typer.Exit(2)
    return None if all_ else set(ids or [])


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=errors, transient=False)


@dlq_app.command("list")
def list_command(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """How many messages each service DLQ holds."""
    with _channel() as channel:
        counts = ops.list_dlqs(channel)
    if as_json:
        console.print_json(json.dumps([{"queue": q, "messages": n} for q, n in counts]))
        return
    table = Table("dead-letter queue", "messages")
    for queue, count in counts:
        table.add_row(queue, "[dim]missing[/dim]" if count is None else str(count))
    console.print(table)


@dlq_app.command("show")
def show_command(
    queue: str = typer.Argument(..., help="e.g. intyg.status or intyg.status.dlq"),
    limit: int = typer.Option(20, "--limit", "-n", min=1, help="At most this many messages, oldest first."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (full headers) instead of a table."),
) -> None:
    """Show the first dead letters of QUEUE (left in the queue; personnummer masked in the body preview)."""
    name = _queue(queue)
    with _channel() as channel:
        letters = ops.peek(channel, name, limit)
    if as_json:
        console.print_json(json.dumps([letter.as_json() for letter in letters]))
        return
    if not letters:
        console.print(f"{name} is empty")
        return
    table = Table("message_id", "routing key", "error code", "error", "attempts", "dead-lettered at", "body",
                  title=f"{name}: first {len(letters)}", show_lines=True)
    for letter in letters:
        table.add_row(letter.message_id or "-", letter.routing_key or "-", letter.error_code or "-",
                      letter.error or "-", "-" if letter.attempts is None else str(letter.attempts),
                      letter.dead_lettered_at or "-", letter.body_preview)
    console.print(table)


@dlq_app.command("replay")
def replay_command(
    queue: str = typer.Argument(..., help="e.g. intyg.status or intyg.status.dlq"),
    ids: list[str] = IdOption,
    all_: bool = typer.Option(False, "--all", help="Replay every message in the DLQ."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be replayed; change nothing."),
) -> None:
    """Republish dead letters unchanged to intyg.commands with their original routing key, then remove them.

    Each dead letter is removed only after the broker confirmed its republish; one that cannot be routed stays.

    The retry bookkeeping headers (x-intyg-attempts, -error-code, -error, -dead-lettered-at, -first-attempt-at) are dropped so that the message gets fresh retries. The service applies a message_id at most once, so a replay never applies anything twice.
    """  # noqa: E501 - typer keeps the line breaks of a help text
    name = _queue(queue)
    selected = _selection(ids, all_, "replay")
    with _channel() as channel, _progress() as progress:
        task = progress.add_task(f"{'checking' if dry_run else 'replaying'} {name}", total=None)
        result = ops.replay(channel, name, selected, dry_run=dry_run,
                            progress_cb=lambda done, total: progress.update(task, completed=done, total=total))
    verb = "would replay" if dry_run else "replayed"
    console.print(f"{verb} {result.replayed} of {result.seen} looked at; {result.failed} failed, "
                  f"{result.requeued} left in {name}")
    for error in result.errors:
        errors.print(f"[yellow]{error}[/yellow]")
    if result.not_found:
        errors.print(f"[yellow]not found:[/yellow] {', '.join(sorted(result.not_found))}")
    if result.failed or result.not_found:
        raise typer.Exit(1)


@dlq_app.command("purge")
def purge_command(
    queue: str = typer.Argument(..., help="e.g. intyg.status or intyg.status.dlq"),
    ids: list[str] = IdOption,
    all_: bool = typer.Option(False, "--all", help="Purge every message in the DLQ."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Delete dead letters for good (the selected ones; the others stay)."""
    name = _queue(queue)
    selected = _selection(ids, all_, "purge")
    what = f"every message in {name}" if selected is None else f"{len(selected)} message(s) from {name}"
    if not yes and not typer.confirm(f"Delete {what} for good?"):
        raise typer.Exit(1)
    with _channel() as channel, _progress() as progress:
        task = progress.add_task(f"purging {name}", total=None)
        result = ops.purge(channel, name, selected,
                           progress_cb=lambda done, total: progress.update(task, completed=done, total=total))
    console.print(f"purged {result.purged} of {result.seen} looked at; {result.requeued} left in {name}")
    if result.not_found:
        errors.print(f"[yellow]not found:[/yellow] {', '.join(sorted(result.not_found))}")
        raise typer.Exit(1)
