"""The acceptrace command line (thin: parsing and wiring only)."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console

from . import __version__
from .errors import UserError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _consoles() -> tuple[Console, Console]:
    return (
        Console(highlight=False, soft_wrap=True),
        Console(stderr=True, highlight=False, soft_wrap=True),
    )


def _positive(name: str, value: float | None) -> float | None:
    if value is not None and value <= 0:
        raise UserError(f"{name} must be a positive number of seconds, not {value:g}")
    return value


@click.group(context_settings=CONTEXT, invoke_without_command=True)
@click.option("--port", "-p", metavar="PORT", help="TCP port the server listens on (1-65535).")
@click.option("--duration", "-d", type=float, metavar="SECONDS", help="Stop after this long.")
@click.option(
    "--interval", "-i", type=float, default=1.0, show_default=True, metavar="SECONDS",
    help="Print a summary line this often.",
)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              metavar="FILE", help="Write the run to FILE (schema acceptrace/v1) on exit.")
@click.option("--slowest", type=click.IntRange(0, 1000), default=20, show_default=True,
              help="How many of the slowest connections to keep.")
@click.version_option(__version__, prog_name="acceptrace")
@click.pass_context
def cli(
    ctx: click.Context,
    port: str | None,
    duration: float | None,
    interval: float,
    json_path: Path | None,
    slowest: int,
) -> None:
    """Trace where TCP connections to PORT wait: SYN queue, accept queue, accept(), first read.

    \b
      sudo acceptrace --port 8000
      sudo acceptrace --port 8000 --duration 60 --json run.json
      sudo acceptrace doctor
      sudo acceptrace demo
    """
    if ctx.invoked_subcommand is not None:
        if port is not None:
            raise UserError("--port goes after the subcommand name, e.g. acceptrace doctor")
        return
    if port is None:
        click.echo(ctx.get_help())
        raise UserError("missing --port: which listening port should be traced?")
    from .runner import TraceOptions, parse_port, trace  # noqa: PLC0415

    opts = TraceOptions(
        port=parse_port(port),
        duration_s=_positive("--duration", duration),
        interval_s=_positive("--interval", interval) or 1.0,
        json_path=json_path,
        slowest_n=slowest,
    )
    out, err = _consoles()
    trace(opts, out, err)


@cli.command()
def doctor() -> None:
    """Say what this kernel offers and which backend acceptrace would use."""
    from .doctor import run_doctor  # noqa: PLC0415

    out, _ = _consoles()
    sys.exit(run_doctor(out))


@cli.command()
@click.option("--duration", "-d", type=float, default=15.0, show_default=True,
              metavar="SECONDS", help="How long to trace the demo server.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              metavar="FILE", help="Also write the run to FILE.")
def demo(duration: float, json_path: Path | None) -> None:
    """Trace the built-in target: a uvicorn+FastAPI app with a small backlog, under load."""
    from .demo import run_demo  # noqa: PLC0415

    out, err = _consoles()
    run_demo(duration_s=_positive("--duration", duration) or 15.0, json_path=json_path,
             out=out, err=err)


@cli.command()
@click.argument("run_json", type=click.Path(dir_okay=False, path_type=Path))
def report(run_json: Path) -> None:
    """Render a run saved with --json."""
    from .model import Run  # noqa: PLC0415
    from .render import render_summary  # noqa: PLC0415

    try:
        run = Run.read(run_json)
    except OSError as exc:
        raise UserError(f"cannot read {run_json}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise UserError(f"{run_json} is not an acceptrace report: {exc}") from exc
    out, _ = _consoles()
    out.print(render_summary(run))


def main(argv: list[str] | None = None) -> int:
    """Entry point: every expected failure is one line on stderr and a non-zero exit."""
    try:
        cli.main(args=argv, prog_name="acceptrace", standalone_mode=False)
    except UserError as exc:
        click.echo(f"acceptrace: {exc}", err=True)
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("acceptrace: aborted", err=True)
        return 130
    except click.ClickException as exc:
        click.echo(f"acceptrace: {exc.format_message()}", err=True)
        return exc.exit_code
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
