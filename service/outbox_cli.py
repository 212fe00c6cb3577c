"""`intygstjanst outbox ...`: the outbox rows the relay parked after `RELAY_MAX_ATTEMPTS` failed publishes.

A parked row is skipped, and so are the later events of its certificate (they must not overtake it); everything
else goes on. Fix the cause (a recipient queue that refuses messages, say), then unpark: the row gets a fresh set
of attempts and is published at the relay's next round. The database comes from `DATABASE_URL`.
"""
from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from service.settings import Settings
from storage import outbox as store
from storage.engine import make_engine

outbox_app = typer.Typer(
    name="outbox",
    help="Outbox rows parked after failing every publish attempt: list them, unpark them.",
    no_args_is_help=True,
)
console = Console()


def _engine():
    return make_engine(Settings().database_url, pool_size=1, max_overflow=0, application_name="intygstjanst-cli")


@outbox_app.command("parked")
def parked_command(
    limit: int = typer.Option(100, "--limit", "-n", min=1, help="At most this many rows, oldest first."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List parked outbox rows (no bodies: they may carry personal data)."""
    engine = _engine()
    try:
        with engine.connect() as conn:
            rows, total = store.parked_rows(conn, limit), store.parked_count(conn)
    finally:
        engine.dispose()
    if as_json:
        typer.echo(json.dumps([{**row._asdict(), "created_at": row.created_at.isoformat(),
                                "parked_at": row.parked_at.isoformat()} for row in rows], indent=2))
        return
    if not rows:
        console.print("no parked outbox rows")
        return
    table = Table("id", "routing key", "message_id", "certificate", "attempts", "parked at", "last error",
                  title=f"parked outbox rows: {len(rows)} of {total}")
    for row in rows:
        table.add_row(str(row.id), row.routing_key, row.message_id, row.ordering_key or "-", str(row.attempts),
                      row.parked_at.isoformat(timespec="seconds"), row.last_error or "-")
    console.print(table)


@outbox_app.command("unpark")
def unpark_command(
    ids: list[int] = typer.Argument(None, help="Ids of parked rows (see `outbox parked`).", show_default=False),
    all_: bool = typer.Option(False, "--all", help="Unpark every parked row."),
) -> None:
    """Give parked rows a fresh set of attempts; the relay publishes them at its next round."""
    if bool(ids) == all_:
        raise typer.BadParameter("give the ids of parked rows, or --all")
    engine = _engine()
    try:
        with engine.begin() as conn:
            count = store.unpark(conn, None if all_ else ids)
    finally:
        engine.dispose()
    console.print(f"unparked {count} outbox row(s)")
    if ids and count < len(set(ids)):
        console.print(f"[yellow]{len(set(ids)) - count} of the given ids are not parked[/yellow]")
        raise typer.Exit(1)
