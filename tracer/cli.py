"""The acceptrace command line (thin: parsing and wiring only)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import click
from rich.console import Console

from . import __version__, bpfstats
from .errors import UserError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _consoles() -> tuple[Console, Console]:
    # A pipe or log file gets 120 columns rather than rich's default of 80.
    width = None if sys.stdout.isatty() else 120
    return (
        Console(highlight=False, soft_wrap=True, width=width),
        Console(stderr=True, highlight=False, soft_wrap=True),
    )


def _positive(name: str, value: float | None) -> float | None:
    if value is not None and value <= 0:
        raise UserError(f"{name} must be a positive number of seconds, not {value:g}")
    return value


@click.group(context_settings=CONTEXT, invoke_without_command=True)
@click.option("--port", "-p", "ports", metavar="PORT", multiple=True,
              help="TCP port the server listens on (1-65535); give it again for several. "
                   "Without it: every TCP listener, ranked worst first.")
@click.option("--duration", "-d", type=float, metavar="SECONDS", help="Stop after this long.")
@click.option(
    "--interval", "-i", type=float, default=1.0, show_default=True, metavar="SECONDS",
    help="Print a summary line this often.",
)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              metavar="FILE", help="Write the run to FILE (schema acceptrace/v1) on exit.")
@click.option("--slowest", type=click.IntRange(0, 1000), default=20, show_default=True,
              help="How many of the slowest connections to keep.")
@click.option("--no-tui", is_flag=True,
              help="One summary line per interval instead of the live dashboard "
                   "(the default when stdout is not a terminal).")
@click.option("--hist", "hist_stage", metavar="STAGE",
              type=click.Choice(["handshake", "accept_queue", "syn_to_accept", "accept_to_read",
                                 "read_to_response", "syn_to_response"]),
              help="Stage whose histogram the dashboard shows (default: the one that dominates; "
                   "key h cycles).")
@click.option("--explain", is_flag=True, help="Explain every figure of the dashboard and exit.")
@click.option("--no-dispatch", is_flag=True,
              help="Do not follow connections into the server (no uprobe on httptools).")
@click.option("--backend", "-b", default="auto", show_default=True, metavar="NAME",
              type=click.Choice(["auto", "fentry", "kprobe", "tracepoint"]),
              help="How to hook the kernel: fentry, kprobe or tracepoint; auto tries them in "
                   "that order by loading each.")
@click.option("--pid", "pid", metavar="PID",
              help="Trace in the network namespace of process PID (a container's server).")
@click.option("--netns", "netns", metavar="NAME|PATH",
              help="Trace in this network namespace: an `ip netns` NAME (/run/netns/NAME) "
                   "or a path such as /proc/PID/ns/net.")
@click.option("--all-namespaces", "-A", "all_namespaces", is_flag=True,
              help="Trace in every network namespace of the host (containers), each "
                   "listener's kernel figures from its own.")
@click.option("--cost-every", "cost_every", type=click.IntRange(0, 1_000_000),
              default=bpfstats.DEFAULT_EVERY,
              show_default=True, metavar="N",
              help="Time acceptrace's BPF programs (the kernel's BPF statistics, which slow "
                   "every BPF program on the host) during one interval in N; 1: every "
                   "interval, 0: never.")
@click.version_option(__version__, prog_name="acceptrace")
@click.pass_context
def cli(
    ctx: click.Context,
    ports: tuple[str, ...],
    duration: float | None,
    interval: float,
    json_path: Path | None,
    slowest: int,
    no_tui: bool,
    hist_stage: str | None,
    explain: bool,
    no_dispatch: bool,
    backend: str,
    pid: str | None,
    netns: str | None,
    all_namespaces: bool,
    cost_every: int,
) -> None:
    """Trace where TCP connections to PORT wait: SYN queue, accept queue, accept(), first read.

    \b
      sudo acceptrace --port 8000
      sudo acceptrace --port 8000 --port 8001     # several ports, each with its own figures
      sudo acceptrace                             # every TCP listener, worst first
      sudo acceptrace --all-namespaces            # ... of every network namespace
      sudo acceptrace --port 8000 --duration 60 --json run.json
      sudo acceptrace --port 8000 --pid 4242      # the namespace of a container's server
      sudo acceptrace export --port 8000          # a Prometheus exporter
      sudo acceptrace doctor
      sudo acceptrace demo
    """
    if explain:
        from .dashboard import explain_text  # noqa: PLC0415

        click.echo(explain_text())
        return
    if ctx.invoked_subcommand is not None:
        if ports or pid is not None or netns is not None or all_namespaces:
            raise UserError("--port, --pid, --netns and --all-namespaces go after the "
                            "subcommand name, e.g. acceptrace doctor")
        return
    from .runner import TraceOptions, parse_pid, parse_port, trace  # noqa: PLC0415

    opts = TraceOptions(
        ports=[parse_port(p) for p in ports],
        all_namespaces=all_namespaces,
        pid=parse_pid(pid) if pid is not None else None,
        netns=netns,
        duration_s=_positive("--duration", duration),
        interval_s=_positive("--interval", interval) or 1.0,
        json_path=json_path,
        slowest_n=slowest,
        tui=not no_tui and sys.stdout.isatty() and sys.stdin.isatty(),
        hist_stage=hist_stage,
        dispatch=not no_dispatch,
        backend=backend,
        cost_every=cost_every,
    )
    out, err = _consoles()
    trace(opts, out, err)


@cli.command()
@click.option("--port", "-p", "port", metavar="PORT",
              help="Also inspect the processes serving PORT (event loop, HTTP parser, dispatch).")
def doctor(port: str | None) -> None:
    """Say what this kernel offers and which backend acceptrace would use."""
    from .doctor import run_doctor  # noqa: PLC0415
    from .runner import parse_port  # noqa: PLC0415

    out, _ = _consoles()
    sys.exit(run_doctor(out, parse_port(port) if port is not None else None))


@cli.command()
@click.option("--duration", "-d", type=float, default=15.0, show_default=True,
              metavar="SECONDS", help="How long to trace the demo server.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              metavar="FILE", help="Also write the run to FILE.")
def demo(duration: float, json_path: Path | None) -> None:
    """Trace the built-in target: a uvicorn+FastAPI app with a small backlog, under load."""
    from .demo import run_demo  # noqa: PLC0415
    from .runner import TraceOptions, trace  # noqa: PLC0415

    out, err = _consoles()
    seconds = _positive("--duration", duration) or 15.0
    tui = sys.stdout.isatty() and sys.stdin.isatty()   # a terminal: the live dashboard

    def trace_demo(port: int, on_started: Callable[[], None],
                   before_summary: Callable[[object], None]) -> object:
        return trace(TraceOptions(port=port, duration_s=seconds, json_path=json_path, tui=tui),
                     out, err, on_started=on_started, before_summary=before_summary)

    run_demo(duration_s=seconds, err=err, trace=trace_demo)


@cli.command()
@click.option("--port", "-p", "ports", metavar="PORT", multiple=True,
              help="TCP port the server listens on; give it again for several. Without it: "
                   "every TCP listener (found again at each interval).")
@click.option("--listen", "listen", metavar="ADDRESS:PORT",
              help="Serve /metrics on this address (default 127.0.0.1:19435; with --textfile "
                   "only if given). 0.0.0.0 or [::] to be scraped from other hosts.")
@click.option("--textfile", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Write the metrics to FILE (atomically) every --interval, for "
                   "node_exporter's textfile collector (a .prom file in its directory).")
@click.option("--interval", "-i", type=float, default=5.0, show_default=True,
              metavar="SECONDS", help="Read the kernel's figures (and write --textfile) this "
                                      "often; a scrape reads them afresh if older than 0.5 s.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              metavar="FILE", help="On exit, write the final state to FILE (schema "
                                   "acceptrace/v1, without intervals).")
@click.option("--buckets-per-octave", "per_octave", default="4", show_default=True,
              type=click.Choice(["1", "2", "4", "8", "16"]),
              help="Histogram le bounds per power of two: histogram_quantile is off by at "
                   "most 1/N of the true value (docs/exporter.md).")
@click.option("--no-dispatch", is_flag=True,
              help="Do not follow connections into the server (no uprobe on httptools).")
@click.option("--backend", "-b", default="auto", show_default=True, metavar="NAME",
              type=click.Choice(["auto", "fentry", "kprobe", "tracepoint"]),
              help="How to hook the kernel (as for a trace).")
@click.option("--pid", "pid", metavar="PID",
              help="Export the network namespace of process PID (a container's server).")
@click.option("--netns", "netns", metavar="NAME|PATH",
              help="Export this network namespace: an `ip netns` NAME or a path.")
@click.option("--all-namespaces", "-A", "all_namespaces", is_flag=True,
              help="Every network namespace of the host (containers).")
@click.option("--cost-every", "cost_every", type=click.IntRange(0, 1_000_000),
              default=bpfstats.DEFAULT_EVERY,
              show_default=True, metavar="N",
              help="Time acceptrace's BPF programs during one interval in N (as for a trace); "
                   "acceptrace_bpf_programs_timed_seconds_total says for how long.")
def export(ports: tuple[str, ...], listen: str | None, textfile: Path | None, interval: float,
           json_path: Path | None, per_octave: str, no_dispatch: bool, backend: str,
           pid: str | None, netns: str | None, all_namespaces: bool, cost_every: int) -> None:
    """Run as a Prometheus exporter: the accept path's counters, histograms and queues at
    /metrics (and/or in a textfile), until SIGTERM.

    \b
      sudo acceptrace export --port 8000               # http://127.0.0.1:19435/metrics
      sudo acceptrace export --listen 0.0.0.0:19435    # every listener, scraped from afar
      sudo acceptrace export --port 8000 \\
          --textfile /var/lib/prometheus/node-exporter/acceptrace.prom
    """
    from . import runner  # noqa: PLC0415
    from .runner import TraceOptions, parse_listen, parse_pid, parse_port  # noqa: PLC0415

    trace_opts = TraceOptions(
        ports=[parse_port(p) for p in ports],
        all_namespaces=all_namespaces,
        pid=parse_pid(pid) if pid is not None else None,
        netns=netns,
        interval_s=_positive("--interval", interval) or 5.0,
        json_path=json_path,
        dispatch=not no_dispatch,
        backend=backend,
        cost_every=cost_every,
    )
    if listen is not None:
        where: tuple[str, int] | None = parse_listen(listen)
    else:
        where = (None if textfile is not None
                 else (runner.DEFAULT_EXPORT_HOST, runner.DEFAULT_EXPORT_PORT))
    _, err = _consoles()
    runner.export(runner.ExportOptions(trace=trace_opts, listen=where, textfile=textfile,
                                       per_octave=int(per_octave)), err)


@cli.group()
def lab() -> None:
    """Each failure mode of the accept path, reproduced in a network namespace of its own:
    the symptom clients see, the cause acceptrace names, the fix, before and after.

    \b
      sudo acceptrace lab list
      sudo acceptrace lab run accept-overflow
      sudo acceptrace lab run all
    """


@lab.command("list")
def lab_list() -> None:
    """The scenarios: symptom, cause, fix."""
    from .lab import render_list  # noqa: PLC0415

    out, _ = _consoles()
    out.print(render_list())


@lab.command("run")
@click.argument("name", metavar="NAME|all")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("lab-results"), show_default=True,
              help="Write NAME/run.json, fixed.json, report.html and lab.json here.")
@click.option("--backend", "-b", default="auto", show_default=True, metavar="NAME",
              type=click.Choice(["auto", "fentry", "kprobe", "tracepoint"]),
              help="How acceptrace hooks the kernel (as for a trace).")
def lab_run(name: str, out_dir: Path, backend: str) -> None:
    """Run scenario NAME (or all): set up, load, trace, diagnose; then the fix, the same
    again, and the comparison. Exit code 1 if an expected cause was not named."""
    from .lab import run_lab  # noqa: PLC0415

    out, err = _consoles()
    sys.exit(run_lab(name, out_dir, backend, out, err))


def _read_run(path: Path):  # noqa: ANN202 - Run, imported lazily
    from .model import Run  # noqa: PLC0415

    try:
        return Run.read(path)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise UserError(f"{path} is not an acceptrace report: {exc}") from exc


@cli.command()
@click.argument("runs", nargs=-1, required=True,
                type=click.Path(dir_okay=False, path_type=Path), metavar="RUN.json [AFTER.json]")
@click.option("--html", "html_path", type=click.Path(dir_okay=False, path_type=Path),
              metavar="FILE", help="Write a self-contained HTML report (of two runs: the "
                                   "comparison).")
@click.option("--port", "-p", "port", metavar="PORT",
              help="Only this listener of a run of several (its own figures).")
@click.option("--namespace", "namespace", metavar="NAME",
              help="... in the namespace the listener table names (host, ip netns NAME, pid N).")
def report(runs: tuple[Path, ...], html_path: Path | None, port: str | None,
           namespace: str | None) -> None:
    """Render a run saved with --json, with a diagnosis; or compare two runs (listener by
    listener when they hold several)."""
    from .render import render_compare_listeners, render_report, select_section  # noqa: PLC0415
    from .runner import parse_port  # noqa: PLC0415

    if len(runs) > 2:
        raise UserError("report takes one run, or two to compare (BEFORE.json AFTER.json)")
    loaded = [_read_run(p) for p in runs]
    if port is not None or namespace is not None:
        want = parse_port(port) if port is not None else None
        picked = []
        for path, run in zip(runs, loaded):
            sec = select_section(run, want, namespace)
            if sec is None:
                raise UserError(f"{path} has no listener "
                                + (f"on port {want}" if want is not None else "")
                                + (f" in namespace {namespace!r}" if namespace else ""))
            picked.append(sec)
        loaded = picked
    out, err = _consoles()
    if html_path is not None:
        from .html import render_html, render_html_compare  # noqa: PLC0415
        from .model import write_text_atomic  # noqa: PLC0415

        page = (render_html(loaded[0]) if len(loaded) == 1 else
                render_html_compare(loaded[0], loaded[1], (runs[0].name, runs[1].name)))
        try:
            write_text_atomic(html_path, page)
        except OSError as exc:
            raise UserError(f"cannot write {html_path}: {exc.strerror or exc}") from exc
        err.print(f"acceptrace: HTML report written to {html_path}")
        return
    if len(loaded) == 2:
        out.print(render_compare_listeners(loaded[0], loaded[1], (runs[0].name, runs[1].name)))
    else:
        out.print(render_report(loaded[0]))


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
