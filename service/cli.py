"""`intygstjanst`: run and operate the certificate service. Configuration comes from the environment
(`AMQP_URL`, `DATABASE_URL`, ...; see `intygstjanst config`)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from service.dlq_cli import dlq_app
from service.outbox_cli import outbox_app
from service.settings import Settings

app = typer.Typer(
    name="intygstjanst",
    help="Intygstjänsten: the certificate service on RabbitMQ and PostgreSQL.\n\n"
         "Configuration comes from environment variables (AMQP_URL, DATABASE_URL, RECIPIENTS, ...); "
         "`intygstjanst config` shows what is in effect.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals may hold a personnummer
)
console = Console()

app.add_typer(dlq_app, name="dlq")
app.add_typer(outbox_app, name="outbox")


def _settings() -> Settings:
    from publishers.amqp import BrokerUrlError, split_nodes

    settings = Settings()
    try:
        split_nodes(settings.amqp_url)
    except BrokerUrlError as wrong:  # a configuration error: retrying cannot help, so say so and stop
        console.print(f"[red]configuration error:[/] {wrong}")
        raise typer.Exit(2) from None
    return settings


def _configure_logging(settings: Settings) -> None:
    from service.logging import configure

    configure(settings.log_level, salt=settings.log_salt or None)


@app.command()
def serve(
    no_relay: Annotated[bool, typer.Option("--no-relay", help="Run the consumers only; another process runs the "
                                                               "outbox relay (`serve --relay-only`).")] = False,
    relay_only: Annotated[bool, typer.Option("--relay-only", help="Run only the outbox relay, which publishes "
                                                                   "committed replies and events.")] = False,
    single_process: Annotated[bool, typer.Option("--single-process", help="Consumers and relay as threads of "
                                                                           "this one process.")] = False,
) -> None:
    """Run the service: migrate, declare the topology, start the outbox relay and the consumers.

    By default as supervised processes (service/supervisor.py): one relay and CONSUMER_PROCESSES consumer
    processes, each restarted when it dies; this process becomes the supervisor (the same pid, a lean process
    image). Stops cleanly on SIGTERM or Ctrl-C: in-flight batches are finished and acknowledged, the outbox is
    flushed, exit code 0.
    """
    if no_relay and relay_only:
        raise typer.BadParameter("--no-relay and --relay-only exclude each other")
    settings = _settings()
    if not (no_relay or relay_only or single_process):
        from service.supervisor import become_supervisor

        become_supervisor(settings)
    _configure_logging(settings)
    from service.app import Service

    service = Service(settings, consumers=not relay_only, relay=not no_relay)
    raise typer.Exit(service.run())


@app.command()
def probe(
    endpoint: Annotated[str, typer.Argument(help="healthz (alive) or readyz (ready to work).")] = "readyz",
    host: Annotated[str, typer.Option(help="Where `serve` runs.")] = "127.0.0.1",
) -> None:
    """Ask a running `serve` (on METRICS_PORT) whether it is alive or ready; exit 0 if so, 1 if not.

    For container health checks (the image has no curl). Prints the JSON answer."""
    import urllib.error
    import urllib.request

    if endpoint not in ("healthz", "readyz"):
        raise typer.BadParameter("healthz or readyz")
    port = _settings().metrics_port
    if not port:
        typer.echo("METRICS_PORT is 0: serve has no health endpoints", err=True)
        raise typer.Exit(1)
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/{endpoint}", timeout=4) as response:
            typer.echo(response.read().decode())
    except urllib.error.HTTPError as not_ok:
        typer.echo(not_ok.read().decode())
        raise typer.Exit(1) from None
    except OSError as unreachable:
        typer.echo(f"no answer on {host}:{port}: {unreachable}", err=True)
        raise typer.Exit(1) from None


@app.command()
def migrate() -> None:
    """Upgrade the database schema to the newest revision (safe to run while other instances start)."""
    from storage import migrate as m

    settings = _settings()
    before = m.current(settings.database_url)
    m.upgrade(settings.database_url)
    after = m.current(settings.database_url)
    if before == after:
        console.print(f"database already at revision [bold]{after}[/]")
    else:
        console.print(f"database migrated from [bold]{before or '(empty)'}[/] to [bold]{after}[/]")


@app.command()
def topology(
    as_json: Annotated[bool, typer.Option("--json", help="Print the declared topology as JSON.")] = False,
    migrate: Annotated[bool, typer.Option("--migrate", help="First rebuild queues and exchanges that exist with "
                                                            "other settings (an older version's), moving their "
                                                            "messages. Stop the consumers first.")] = False,
) -> None:
    """Declare the exchanges, queues and bindings on the broker (idempotent) and print them."""
    from service import topology as t

    settings = _settings()
    if migrate:
        from service.topology_migrate import migrate_with

        done = migrate_with(settings)
        for name in done.exchanges:
            console.print(f"exchange [bold]{name}[/] declared anew")
        for name, moved in {**done.queues, **done.resumed}.items():
            console.print(f"queue [bold]{name}[/] declared anew, {moved} messages moved back into it")
    try:
        summary = t.declare_with(settings.amqp_url, settings)
    except t.TopologyConflict as conflict:
        console.print(f"[red]{conflict}[/]")
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(summary.as_dict(), indent=2))
        return
    table = Table(title="intygstjänsten topology (declared)")
    table.add_column("queue", no_wrap=True)
    table.add_column("type")
    table.add_column("what arrives / where it goes", overflow="fold")
    for q in summary.queues:
        if q.role == "retry":
            ttl = q.arguments["x-message-ttl"] / 1000
            detail = f"retry copies; after {ttl:g}s back to {q.arguments['x-dead-letter-routing-key']}"
        elif q.role == "dlq":
            detail = "dead letters"
        else:
            detail = ", ".join(q.bindings)
        table.add_row(q.name, q.kind, detail)
    console.print("exchanges: " + ", ".join(f"{e.name} ({e.kind})" for e in summary.exchanges))
    console.print(table)


@app.command()
def schema(
    directory: Annotated[Path, typer.Argument(help="Directory to write the schema files to (created if missing).",
                                              file_okay=False)],
) -> None:
    """Write one JSON Schema file per message type to DIRECTORY.

    Commands, queries, events, the reply and the stored certificate, as DIRECTORY/<type>.schema.json.
    """
    from contracts.registry import json_schemas

    directory.mkdir(parents=True, exist_ok=True)
    schemas = json_schemas()
    for name, document in sorted(schemas.items()):
        (directory / f"{name}.schema.json").write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n",
                                                       encoding="utf-8")
    console.print(f"wrote {len(schemas)} schemas to {directory}")


@app.command()
def asyncapi(
    fmt: Annotated[str, typer.Option("--format", help="yaml or json.")] = "yaml",
    out: Annotated[Path | None, typer.Option("--out", help="Write to FILE instead of standard output.",
                                             metavar="FILE")] = None,
) -> None:
    """Write the contract as an AsyncAPI 3.0 document, generated from the models and the declared topology.

    `intygstjanst asyncapi --out docs/asyncapi.yaml` regenerates the committed copy.
    """
    from service import asyncapi as a

    if fmt not in a.FORMATS:
        _usage_error(f"--format must be one of {', '.join(a.FORMATS)}, not {fmt!r}")
    text = a.render(a.document(), fmt)
    if out is None:
        typer.echo(text, nl=False)
        return
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as error:
        _usage_error(f"cannot write {out}: {error.strerror or error}")
    typer.echo(f"wrote {out}", err=True)


def _usage_error(message: str) -> None:
    """One line on standard error and exit code 2, like any other bad argument."""
    typer.echo(f"intygstjanst: error: {message}", err=True)
    raise typer.Exit(2)


@app.command()
def demo(
    seed: Annotated[int | None, typer.Option(help="Seed for the made-up patient, to repeat a run.")] = None,
) -> None:
    """Play a care system, a citizen and Försäkringskassan against a running service, step by step:
    register, list, send to FKASSA, FKASSA receives it, archive, care removes its copy, consent withdrawn, purge.

    Needs `intygstjanst serve` running against the same AMQP_URL.
    """
    from publishers.amqp import Broker
    from service import demo as d
    from service.client import ReplyTimeout

    try:
        d.run(Broker.from_settings(_settings()), console, seed=seed)
    except ReplyTimeout as timeout:
        console.print(f"[red]{timeout}[/] — is `intygstjanst serve` running against this AMQP_URL?")
        raise typer.Exit(1) from None


@app.command()
def config() -> None:
    """Print the settings in effect as JSON (passwords and the log salt hidden)."""
    typer.echo(json.dumps(_settings().redacted(), indent=2, ensure_ascii=False))


def main() -> None:  # pragma: no cover
    app(prog_name="intygstjanst")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
