"""`intygstjanst dlq ...`: look at, group, replay and purge the dead-letter queues (CONTRACT §8).

The broker comes from `AMQP_URL` (see `service.settings`). QUEUE is a service queue or its DLQ:
`intyg.status` and `intyg.status.dlq` mean the same.

Made for an operator's terminal (80 columns will do): `show` prints one block per dead letter with its body
masked (`publishers.dlq.mask`); `--body` shows the body as it is and records that access as a JSON log line on
stderr (who: the broker user and the login; which queue and message ids; when). `--output json` is for tools.
`summary` groups dead letters by why they failed, and `--code`/`--since`/`--until` select a group to show,
replay or purge.
"""
from __future__ import annotations

import datetime as dt
import getpass
import itertools
import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from enum import Enum
from typing import Any

import typer
from pika.exceptions import AMQPError, ChannelClosedByBroker
from rich.console import Console, Group as Stack
from rich.padding import Padding
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from publishers import amqp
from publishers import dlq as ops
from service.logging import audit_logger
from service.settings import Settings

dlq_app = typer.Typer(
    name="dlq",
    help="Dead-letter queues: list them, group them by why they failed, show their messages (masked), replay "
         "them to intyg.commands, purge them.\n\n"
         "QUEUE is a service queue or its DLQ (intyg.status = intyg.status.dlq). The broker is AMQP_URL.\n\n"
         "Browsing is not free: every message looked at and left in place is requeued (its redelivered flag is "
         "set, and on a quorum queue it counts as a delivery).",
    no_args_is_help=True,
)
console = Console()
errors = Console(stderr=True)


class Output(str, Enum):
    text = "text"
    json = "json"


IdOption = typer.Option(None, "--id", help="message_id of a dead letter; repeat for several.", show_default=False)
OutputOption = typer.Option(Output.text, "--output", "-o", help="text (for a terminal) or json (for tools).")
JsonOption = typer.Option(False, "--json", hidden=True, help="Same as --output json.")
CodeOption = typer.Option(None, "--code", show_default=False,
                          help="Only dead letters that failed with this code (repeatable), as `dlq summary` names "
                               "them: UNAVAILABLE, INVALID_MESSAGE, broker:delivery_limit, ...")
SinceOption = typer.Option(None, "--since", show_default=False, metavar="TIME",
                           help="Only dead letters dead-lettered at or after TIME (ISO 8601, e.g. "
                                "2026-11-25T18:00; without an offset it is this machine's local time).")
UntilOption = typer.Option(None, "--until", show_default=False, metavar="TIME",
                           help="Only dead letters dead-lettered before TIME (as --since).")


@contextmanager
def _channel() -> Iterator[Any]:
    try:
        connection = amqp.connect(amqp.Broker.from_settings(Settings()), "intygstjanst dlq")
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


def _time(value: str | None, option: str) -> dt.datetime | None:
    if value is None:
        return None
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not an ISO 8601 time (2026-11-25T18:00)", param_hint=option) from None
    return moment.astimezone(dt.UTC)  # a time without an offset is the operator's local time


def _filter(codes: list[str] | None, since: str | None, until: str | None) -> ops.Filter:
    return ops.Filter(frozenset(codes) if codes else None, _time(since, "--since"), _time(until, "--until"))


def _describe(where: ops.Filter) -> str:
    parts = []
    if where.codes:
        parts.append("code " + " or ".join(sorted(where.codes)))
    if where.since is not None:
        parts.append(f"since {ops.rfc3339(where.since)}")
    if where.until is not None:
        parts.append(f"until {ops.rfc3339(where.until)}")
    return ", ".join(parts)


def _selection(ids: list[str] | None, all_: bool, where: ops.Filter, verb: str) -> set[str] | None:
    if ids and all_:
        raise typer.BadParameter("give either --id ... or --all, not both")
    if ids and where:
        raise typer.BadParameter("give either --id ... or --code/--since/--until, not both")
    if not ids and not all_ and not where:
        errors.print(f"[red]refusing to {verb} nothing in particular:[/red] give --id MESSAGE_ID (repeatable), "
                     f"--code CODE / --since TIME (see `intygstjanst dlq summary`), or --all")
        raise typer.Exit(2)
    return set(ids) if ids else None


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=errors, transient=False)


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, ensure_ascii=False))


def _record_reveal(user: str | None, queue: str, letters: Sequence[ops.DeadLetter]) -> None:
    """Showing a body is an access to personal data: say who looked at which messages (the timestamp says when)."""
    try:
        login = getpass.getuser()
    except (OSError, KeyError):  # no user name for this uid (a container)
        login = None
    audit_logger(sys.stderr).warning("dead-letter bodies shown", broker_user=user, os_user=login, queue=queue,
                                     message_ids=[letter.message_id for letter in letters], count=len(letters))


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
    limit: int = typer.Option(20, "--limit", "-n", min=1,
                              help="At most this many messages, in queue order (browsing may reorder a quorum "
                                   "queue)."),
    ids: list[str] = IdOption,
    body: bool = typer.Option(False, "--body", help="Show the bodies as they are (personal data: the access is "
                                                    "logged on stderr)."),
    codes: list[str] = CodeOption,
    since: str = SinceOption,
    until: str = UntilOption,
    output: Output = OutputOption,
    as_json: bool = JsonOption,
) -> None:
    """Show the first dead letters of QUEUE, one block each (left in the queue; bodies masked unless --body)."""
    name = _queue(queue)
    where = _filter(codes, since, until)
    narrowed = bool(where or ids)
    with _channel() as channel:
        total = ops.message_count(channel, name)
        user = ops.connection_user(channel)
        if narrowed:  # looks at them in order, keeps the first `limit` that match
            browsing = ops.browse(channel, name)
            try:
                letters = list(itertools.islice((letter for letter in browsing if where.matches(letter)
                                                 and (not ids or letter.message_id in ids)), limit))
            finally:
                browsing.close()  # gives back what it holds
        else:
            letters = ops.peek(channel, name, limit)
    if body and letters:
        _record_reveal(user, name, letters)
    if as_json or output is Output.json:
        _print_json([letter.as_json(reveal=body) for letter in letters])
        return
    selected = f" ({_describe(where)})" if where else ""
    if not letters:
        console.print(Text(f"{name}: no dead letters{selected}; {total} in the queue"))
        return
    masked = "bodies shown as they are" if body else "bodies masked (--body shows them, and is logged)"
    console.print(Text(f"{name}: {len(letters)} of {total} dead letters{selected}, in queue order; {masked}",
                       style="bold"))
    for n, letter in enumerate(letters, 1):
        console.print(_block(n, letter, reveal=body))


def _block(n: int, letter: ops.DeadLetter, *, reveal: bool) -> Stack:
    """One dead letter: a rule with its message id, then label/value rows that wrap within the terminal."""
    rows = Table.grid(padding=(0, 2))
    rows.add_column(style="bold", no_wrap=True)
    rows.add_column(overflow="fold")
    if letter.by_broker:
        why = (f"{letter.code}: dead-lettered by the broker, not by the service (the message kept failing before "
               f"the service could answer it: no reply was sent)")
    else:
        why = f"{letter.code}: {letter.error or '-'}"
    rows.add_row("why", Text(why, style="red"))
    rows.add_row("type", Text(letter.routing_key or "- (unknown: cannot be replayed)"))
    when = letter.dead_lettered_at or "-"
    by = "the broker" if letter.by_broker else "the service"
    attempts = f", after {letter.attempts} attempt(s)" if letter.attempts is not None else ""
    rows.add_row("when", Text(f"{when} by {by}{attempts}"))
    if letter.sender:
        rows.add_row("sender", Text(letter.sender))
    size = f"{len(letter.body)} bytes" + (f", {letter.content_type}" if letter.content_type else "")
    rows.add_row("body", Text(size + ("" if reveal else ", masked")))
    rows.add_row("", Text(_revealed(letter.body)) if reveal else Text(letter.masked_body(), style="dim"))
    return Stack(Rule(Text(f" {n}. {letter.message_id or '(no message_id)'} ", style="bold"), align="left"),
                 Padding(rows, (0, 0, 1, 1)))


def _revealed(body: bytes) -> str:
    try:
        return json.dumps(json.loads(body), indent=2, ensure_ascii=False)
    except ValueError:
        return body.decode("utf-8", errors="replace")


@dlq_app.command("summary")
def summary_command(
    queues: list[str] = typer.Argument(None, help="Service queues or DLQs (default: every service DLQ)."),
    since: str = SinceOption,
    until: str = UntilOption,
    output: Output = OutputOption,
) -> None:
    """Group the dead letters by why they failed, with counts and times: each group is one replay command away."""
    where = _filter(None, since, until)
    with _channel() as channel:
        names = [_queue(q) for q in queues] if queues else [q for q, n in ops.list_dlqs(channel) if n is not None]
        groups = ops.summarize(letter for name in names for letter in ops.browse(channel, name)
                               if where.matches(letter))
    if output is Output.json:
        _print_json([group.as_json() for group in groups])
        return
    selected = f" ({_describe(where)})" if where else ""
    if not groups:
        console.print(Text(f"no dead letters{selected} in {', '.join(names)}"))
        return
    console.print(Text(f"{sum(g.count for g in groups)} dead letters{selected}, by queue and why they failed "
                       f"(times UTC):", style="bold"))
    code_width = max(len(g.code) for g in groups)  # one column width for every queue's table
    for name in names:
        mine = [g for g in groups if g.queue == name]
        if not mine:
            continue
        console.print(Rule(Text(f" {name}: {sum(g.count for g in mine)} ", style="bold"), align="left"))
        table = Table.grid(padding=(0, 2))
        table.add_column(no_wrap=True, style="red", min_width=code_width)
        table.add_column(justify="right", no_wrap=True)
        table.add_column(overflow="fold")
        for group in mine:
            span = _when(group.oldest) + ("" if group.newest == group.oldest else f" - {_when(group.newest)}")
            types = ", ".join(f"{t} x{n}" for t, n in group.types.most_common())
            error, _ = group.errors.most_common(1)[0]
            others = f" (+{len(group.errors) - 1} other reasons)" if len(group.errors) > 1 else ""
            table.add_row(Text(group.code), str(group.count), Text(span))
            table.add_row("", "", Text(types, style="dim"))
            table.add_row("", "", Text(error + others, style="dim"))
        console.print(Padding(table, (0, 0, 1, 1)))
    example = groups[0]
    console.print(Text("Replay a group (--dry-run first shows what it would do):"))
    console.print(Text(f"  intygstjanst dlq replay {example.queue.removesuffix('.dlq')} --code {example.code} "
                       f"[--since TIME]"))


def _when(stamp: str | None) -> str:
    """`2026-11-25 18:03` (the minute is enough to pick a --since)."""
    moment = ops.parse_time(stamp)
    return "?" if moment is None else moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M")


@dlq_app.command("replay")
def replay_command(
    queue: str = typer.Argument(..., help="e.g. intyg.status or intyg.status.dlq"),
    ids: list[str] = IdOption,
    all_: bool = typer.Option(False, "--all", help="Replay every message in the DLQ."),
    codes: list[str] = CodeOption,
    since: str = SinceOption,
    until: str = UntilOption,
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be replayed; change nothing."),
) -> None:
    """Republish dead letters to intyg.commands with their original routing key, then remove them.

    Select them by --id, by why and when they failed (--code, --since, --until; `dlq summary` lists the groups), or --all. Each dead letter is removed only after the broker confirmed its republish; one that cannot be routed stays.

    The body and properties are republished unchanged, with the service's signed bookkeeping (so the replay acts as the original sender); why it was dead-lettered and the broker's own headers are dropped, and the service gives it fresh retries. The service applies a message_id at most once, so a replay never applies anything twice.
    """  # noqa: E501 - typer keeps the line breaks of a help text
    name = _queue(queue)
    where = _filter(codes, since, until)
    selected = _selection(ids, all_, where, "replay")
    with _channel() as channel, _progress() as progress:
        task = progress.add_task(f"{'checking' if dry_run else 'replaying'} {name}", total=None)
        result = ops.replay(channel, name, selected, dry_run=dry_run, where=where or None,
                            progress_cb=lambda done, total: progress.update(task, completed=done, total=total))
    verb = "would replay" if dry_run else "replayed"
    which = f" ({_describe(where)})" if where else ""
    console.print(f"{verb} {result.replayed} of {result.seen} looked at{which}; {result.failed} failed, "
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
    codes: list[str] = CodeOption,
    since: str = SinceOption,
    until: str = UntilOption,
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Delete dead letters for good (the selected ones; the others stay)."""
    name = _queue(queue)
    where = _filter(codes, since, until)
    selected = _selection(ids, all_, where, "purge")
    if where:
        what = f"the dead letters of {name} with {_describe(where)}"
    elif selected is None:
        what = f"every message in {name}"
    else:
        what = f"{len(selected)} message(s) from {name}"
    if not yes and not typer.confirm(f"Delete {what} for good?"):
        raise typer.Exit(1)
    with _channel() as channel, _progress() as progress:
        task = progress.add_task(f"purging {name}", total=None)
        result = ops.purge(channel, name, selected, where=where or None,
                           progress_cb=lambda done, total: progress.update(task, completed=done, total=total))
    console.print(f"purged {result.purged} of {result.seen} looked at; {result.requeued} left in {name}")
    if result.not_found:
        errors.print(f"[yellow]not found:[/yellow] {', '.join(sorted(result.not_found))}")
        raise typer.Exit(1)
