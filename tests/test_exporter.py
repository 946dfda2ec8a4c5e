"""acceptrace export, scraped by a real Prometheus (Debian's package), against the kernel.

Everything runs in a network namespace the test makes: two servers, one that lets its
accept queue overflow and one that waits a known delay before each accept(), restarted
halfway.  The exporter (in the host namespace, traced namespace given by --netns) is
scraped every second by a Prometheus this test starts on a free loopback port with a
temp TSDB; its HTTP API must show the namespace's own ListenOverflows delta (raw
counter values, not increase(), which extrapolates), a histogram_quantile within the
documented bucket error of the delay, counters that never went back across the
restart, and the same counts as the exporter's final JSON.  Also: the shipped rules
and config (promtool), the dashboard's queries (the live Prometheus parses them), the
textfile mode (atomic, node_exporter reads it) under the unit's capabilities only,
and bad input (one line, exit 2).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from acceptrace.demo import free_port
from conftest import backend_args, scaled, unseen_packets, wait_until
from helpers import run_cli
from test_netns import CLIENTS, SERVER, in_ns, network_namespace, ns_netstat

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "docs" / "deploy"
PER_OCTAVE = 4  # the exporter's default: histogram_quantile within 1/4 of the true value

# Waits `delay` between a connection being queued and accept(): every connection's
# accept-queue wait is the delay (plus the wake-up), a known answer.
DELAY_SERVER = r"""
import select, socket, sys, time
port, delay = int(sys.argv[1]), float(sys.argv[2])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port)); s.listen(16)
print("ready", flush=True)
while True:
    select.select([s], [], [])
    time.sleep(delay)
    c, _ = s.accept()
    c.recv(100); c.sendall(b"ok"); c.close()
"""
# n clients one after the other.
SEQ_CLIENTS = r"""
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
for _ in range(n):
    c = socket.create_connection(("127.0.0.1", port), timeout=30)
    c.sendall(b"hello"); assert c.recv(10) == b"ok"; c.close()
print(n, flush=True)
"""


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} missing: Debian's prometheus package (make setup)"
    return path


def get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback only
        return bytes(r.read())


class Exporter:
    """`python -m acceptrace export ...` as a subprocess, until SIGTERM."""

    def __init__(self, *args: str, prefix: list[str] | None = None) -> None:
        self.argv = [*(prefix or []), sys.executable, "-m", "acceptrace", "export",
                     *backend_args(), *args]
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self._up = threading.Event()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if "acceptrace: exporting " in line:
                self._up.set()
        self._up.set()

    def __enter__(self) -> Exporter:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        if not self._up.wait(scaled(90)) or self.proc.poll() is not None:
            self.proc.kill()
            raise AssertionError("exporter did not start:\n" + self.stderr)
        return self

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(scaled(30))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("exporter ignored SIGTERM:\n" + self.stderr) from None

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @property
    def stderr(self) -> str:
        return "".join(self.lines)


class Prometheus:
    """Debian's prometheus on a free loopback port, scraping `target` every 2 seconds,
    with the shipped rules loaded; its HTTP API."""

    def __init__(self, tmp: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = tmp / "prometheus.yml"
        shutil.copy(DEPLOY / "acceptrace-rules.yml", tmp / "acceptrace-rules.yml")
        self.config.write_text(
            # a scrape may take up to its interval: 2 s leaves room on a busy 2-core CI
            "global: {scrape_interval: 2s, scrape_timeout: 2s, evaluation_interval: 1s}\n"
            "rule_files: [acceptrace-rules.yml]\n"
            "scrape_configs:\n"
            "  - job_name: acceptrace\n"
            f"    static_configs: [{{targets: ['{target}']}}]\n")
        self.argv = [tool("prometheus"), f"--config.file={self.config}",
                     f"--storage.tsdb.path={tmp / 'tsdb'}",
                     f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"]
        self.log = tmp / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Prometheus:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)

        def ready() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            try:
                return get(self.url + "/-/ready", 1).startswith(b"Prometheus")
            except OSError:
                return False

        assert wait_until(ready, 30, 0.2), self.log.read_text()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(scaled(15))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def api(self, path: str, **params: str) -> dict:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        data = json.loads(get(url))
        assert data["status"] == "success", data
        return data["data"]  # type: ignore[no-any-return]

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        res = self.api("query", query=expr)["result"]
        return [(r["metric"], float(r["value"][1])) for r in res]

    def one(self, expr: str) -> float:
        res = self.query(expr)
        assert len(res) == 1, (expr, res)
        return res[0][1]

    def target(self) -> dict:
        """The one scrape target ({} until Prometheus has loaded it)."""
        targets = self.api("targets")["activeTargets"]
        assert len(targets) <= 1, targets
        return targets[0] if targets else {}  # type: ignore[no-any-return]

    def scraped_after(self, t: float) -> bool:
        """A scrape that began after wall-clock time t has been stored."""
        res = self.query("timestamp(acceptrace_build_info)")
        return bool(res) and res[0][1] > t


@contextmanager
def server(ns: str, script: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(in_ns(ns, sys.executable, "-c", script, *args),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def clients(ns: str, script: str, port: int, n: int) -> subprocess.Popen[str]:
    return subprocess.Popen(in_ns(ns, sys.executable, "-c", script, str(port), str(n)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str], n: int) -> None:
    out, errs = proc.communicate(timeout=scaled(120))
    assert out.strip() == str(n), errs


def settle_ns(ns: str, quiet_s: float = 1.5, timeout: float = 20.0) -> None:
    """Until the namespace's listen counters have not moved for quiet_s."""
    keys = ("TcpExtListenOverflows", "TcpExtListenDrops", "TcpPassiveOpens")
    last = {k: ns_netstat(ns)[k] for k in keys}
    since = time.monotonic()
    end = since + scaled(timeout)
    while time.monotonic() < end:
        time.sleep(0.2)
        now = {k: ns_netstat(ns)[k] for k in keys}
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return


def sections(report: dict) -> dict[int, dict]:
    return {t["meta"]["port"]: t for t in report["targets"]}


@pytest.mark.root
def test_prometheus_scrapes_the_exporter(tmp_path):
    ovf_port, delay_port, delay = 8000, 8001, 0.2
    n_ovf, n_delay1, n_delay2 = 16, 8, 6
    json_path = tmp_path / "final.json"
    with network_namespace() as ns:
        label = f"netns:{ns}"
        with server(ns, SERVER, str(ovf_port), "2") as ovf, \
                server(ns, DELAY_SERVER, str(delay_port), str(delay)) as first:
            before = ns_netstat(ns)
            ep = free_port()
            with Exporter("--netns", ns, "--port", str(ovf_port), "--port", str(delay_port),
                          "--listen", f"127.0.0.1:{ep}", "--interval", "1",
                          "--json", str(json_path)) as exp, \
                    Prometheus(tmp_path, f"127.0.0.1:{ep}") as prom:
                assert wait_until(lambda: prom.target().get("health") == "up", 30, 0.2), \
                    (prom.target(), exp.stderr)
                # 1. the known delay, then the delay server restarts (its listener is
                # gone for a few scrapes, then back), then more connections
                finish(clients(ns, SEQ_CLIENTS, delay_port, n_delay1), n_delay1)
                first.kill()
                first.wait()
                sel = f'namespace="{label}",port="{delay_port}"'
                assert wait_until(lambda: prom.query(f"acceptrace_listening{{{sel}}} == 0"),
                                  20, 0.2), exp.stderr
                with server(ns, DELAY_SERVER, str(delay_port), str(delay)):
                    assert wait_until(
                        lambda: prom.query(f"acceptrace_listening{{{sel}}} == 1"), 20, 0.2)
                    finish(clients(ns, SEQ_CLIENTS, delay_port, n_delay2), n_delay2)
                    # 2. the other port overflows: its server accepts nothing for 1.5 s
                    load = clients(ns, CLIENTS, ovf_port, n_ovf)
                    assert wait_until(lambda: ns_netstat(ns)["TcpExtListenOverflows"]
                                      > before["TcpExtListenOverflows"], 30, 0.2)
                    assert ovf.stdin is not None
                    ovf.stdin.write("go\n")
                    ovf.stdin.flush()
                    finish(load, n_ovf)
                    settle_ns(ns)
                    after = ns_netstat(ns)
                    settled = time.time()
                    assert wait_until(lambda: prom.scraped_after(settled + 1), 20, 0.2)

                    # -- through Prometheus' HTTP API: raw counter values --------------
                    overflows = after["TcpExtListenOverflows"] - before["TcpExtListenOverflows"]
                    assert overflows > 0
                    assert prom.one(f'acceptrace_netstat_total{{namespace="{label}",'
                                    'name="TcpExtListenOverflows"}') == overflows
                    drops = prom.query(f'sum(acceptrace_drops_total{{port="{ovf_port}",'
                                       'reason=~"syn_dropped|ack_dropped"})')
                    q50 = prom.one(f'histogram_quantile(0.5, acceptrace_stage_duration_'
                                   f'seconds_bucket{{{sel},stage="accept_queue"}})')
                    resets = prom.one(
                        "sum(resets(acceptrace_connections_total[10m]))"
                        " + sum(resets(acceptrace_drops_total[10m]))"
                        " + sum(resets(acceptrace_stage_duration_seconds_bucket[10m]))"
                        " + sum(resets(acceptrace_netstat_total[10m]))")
                    held = prom.one("max_over_time(acceptrace_regressions_held_total[10m])")
                    up_min = prom.one('min_over_time(up{job="acceptrace"}[10m])')
                    ups = prom.api("query", query='up{job="acceptrace"}[10m]')
                    durations = prom.api("query", query="scrape_duration_seconds[10m]")
                    scraped = {(m["port"], m["event"]): v for m, v in prom.query(
                        f'acceptrace_connections_total{{namespace="{label}"}}')}
                    stage_counts = {(m["port"], m["stage"]): v for m, v in prom.query(
                        "acceptrace_stage_duration_seconds_count")}
                    drop_series = {(m["port"], m["reason"]): v for m, v in prom.query(
                        "acceptrace_drops_total")}
                    target = prom.target()
                    # -- promtool on a real scrape; the dashboard's queries parse ----------
                    scrape = get(f"http://127.0.0.1:{ep}/metrics").decode()
                    check = subprocess.run([tool("promtool"), "check", "metrics"],
                                           input=scrape, capture_output=True, text=True)
                    assert check.returncode == 0, check.stdout + check.stderr
                    for expr in dashboard_queries():
                        prom.api("query", query=expr)  # status success, or it raises
                assert exp.stop() == 0, exp.stderr
    report = json.loads(json_path.read_text())
    secs = sections(report)
    assert target["health"] == "up" and target["lastError"] == "", target
    if up_min != 1:
        failed = [t for r in ups["result"] for t, v in r["values"] if v == "0"]
        slowest = max((float(v) for r in durations["result"] for _, v in r["values"]),
                      default=None)
        raise AssertionError(f"scrapes failed at {failed} (slowest answered in {slowest} s); "
                             f"exporter said:\n{exp.stderr[-2000:]}")
    assert resets == 0 and held == 0, (resets, held)
    # drops: the namespace's own ListenOverflows delta (or, where the backend cannot split
    # SYN from ACK overflows, no such series and the kernel's counter beside it)
    if secs[ovf_port]["drops"]["listen_overflow"] is None:
        assert drops == [], drops
    else:
        slack = unseen_packets(report, "syn_dropped_acceptq_full", "ack_dropped_acceptq_full")
        assert drops and overflows - slack <= drops[0][1] <= overflows, (drops, overflows)
    # the known delay: every wait was delay + the wake-up (exact min/max from the JSON);
    # histogram_quantile is off by at most 1/PER_OCTAVE of the true median
    aq = secs[delay_port]["stages"]["accept_queue"]
    assert aq["count"] == n_delay1 + n_delay2
    assert aq["min"] >= delay * 1e6, aq
    lo, hi = aq["min"] * 1e-6, aq["max"] * 1e-6
    assert lo * (1 - 1 / PER_OCTAVE) <= q50 <= hi * (1 + 1 / PER_OCTAVE), (q50, aq)
    # counts: Prometheus' last scrape equals the exporter's final state
    for port, sec in secs.items():
        for event in ("syn", "queued", "accepted", "read"):
            assert scraped[(str(port), event)] == sec["connections"][event], (port, event)
        for reason in ("syn_dropped", "ack_dropped"):
            if sec["drops"][reason] is not None:
                assert drop_series[(str(port), reason)] == sec["drops"][reason]
        for stage, h in sec["stages"].items():
            if h is not None:
                assert stage_counts[(str(port), stage)] == h["count"], (port, stage)
    assert secs[delay_port]["connections"]["accepted"] == n_delay1 + n_delay2
    assert secs[ovf_port]["connections"]["accepted"] == n_ovf


def dashboard_queries() -> list[str]:
    """The dashboard's PromQL with Grafana's variables filled in."""
    dash = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"].removeprefix("label_values(").rpartition(",")[0]
              for v in dash["templating"]["list"] if v["type"] == "query"]
    out = []
    for e in exprs:
        e = e.replace("$__rate_interval", "1m")
        out.append(re.sub(r"\$\w+", ".*", e))
    assert len(out) >= 10 and all("$" not in e for e in out), out
    return out


def test_shipped_rules_and_config_pass_promtool():
    promtool = tool("promtool")
    for args in (["check", "rules", str(DEPLOY / "acceptrace-rules.yml")],
                 ["check", "config", str(DEPLOY / "prometheus.yml")],
                 # the alerts fire on what they claim (synthetic series)
                 ["test", "rules", str(REPO / "tests" / "fixtures" / "acceptrace-rules.test.yml")]):
        res = subprocess.run([promtool, *args], capture_output=True, text=True, cwd=DEPLOY)
        assert res.returncode == 0, (args, res.stdout + res.stderr)


def test_shipped_unit_is_valid():
    unit = (DEPLOY / "acceptrace-exporter.service").read_text()
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze missing")
    exe = Path(sys.executable).with_name("acceptrace")
    assert exe.exists(), exe
    local = Path(os.environ.get("TMPDIR", "/tmp")) / f"acceptrace-exporter-{os.getpid()}.service"
    local.write_text(unit.replace("/usr/local/bin/acceptrace", str(exe)))
    try:
        res = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True)
    finally:
        local.unlink()
    assert res.returncode == 0, res.stdout + res.stderr


def unit_capabilities() -> list[str]:
    unit = (DEPLOY / "acceptrace-exporter.service").read_text()
    m = re.search(r"^CapabilityBoundingSet=(.+)$", unit, re.M)
    assert m, "no CapabilityBoundingSet in the unit"
    caps = m.group(1).split()
    assert all(c.startswith("CAP_") for c in caps) and "CAP_NET_ADMIN" not in caps, caps
    return caps


@pytest.mark.root
def test_textfile_is_atomic_and_read_by_node_exporter_under_the_units_capabilities(tmp_path):
    """The exporter with only the shipped unit's capabilities (setpriv): a reader polling
    the textfile never sees half of it, promtool and node_exporter's textfile collector
    accept it, and the server process was found (/proc/PID/fd: CAP_SYS_PTRACE)."""
    caps = ",".join(["-all"] + ["+" + c.removeprefix("CAP_").lower() for c in unit_capabilities()])
    setpriv = [tool("setpriv"), "--bounding-set", caps, "--inh-caps", caps,
               "--ambient-caps", caps, "--"]
    out_dir = tmp_path / "textfile"
    out_dir.mkdir()
    prom_file = out_dir / "acceptrace.prom"
    port, n = 8000, 6
    seen: list[str] = []
    versions: set[tuple[int, int]] = set()   # (inode, mtime) of each file read
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                with open(prom_file) as f:
                    st = os.fstat(f.fileno())
                    seen.append(f.read())
                versions.add((st.st_ino, st.st_mtime_ns))
            except FileNotFoundError:
                pass

    with network_namespace() as ns, server(ns, DELAY_SERVER, str(port), "0.01") as srv:
        with Exporter("--netns", ns, "--port", str(port), "--textfile", str(prom_file),
                      "--interval", "0.1", prefix=setpriv) as exp:
            th = threading.Thread(target=reader, daemon=True)
            th.start()
            finish(clients(ns, SEQ_CLIENTS, port, n), n)
            assert wait_until(lambda: len(versions) > 10, 30, 0.1), len(versions)
            stop.set()
            th.join(5)
            assert exp.stop() == 0, exp.stderr
        assert f"(pid {srv.pid})" in exp.stderr, exp.stderr  # it inspected the server
    # rewritten while read (every 0.1 s asked; a read of the kernel takes longer): many
    # files, and the counts changed between them
    assert len(versions) > 10 and len(set(seen)) >= 2, (len(versions), len(set(seen)))
    last = "acceptrace_regressions_held_total"
    for text in seen:  # every version whole: it ends with the last family
        assert text.endswith("\n") and f"\n{last} " in text, text[-200:]
    final = prom_file.read_text()
    assert re.search(rf'acceptrace_connections_total{{event="accepted",namespace="netns:{ns}",'
                     rf'port="{port}"}} {n}\.0', final), final
    check = subprocess.run([tool("promtool"), "check", "metrics"], input=final,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert not list(out_dir.glob(".*.tmp")), list(out_dir.iterdir())  # no temp file left
    # node_exporter's textfile collector reads it without error
    node_port = free_port()
    node = subprocess.Popen([tool("prometheus-node-exporter"), "--collector.disable-defaults",
                             "--collector.textfile",
                             f"--collector.textfile.directory={out_dir}",
                             f"--web.listen-address=127.0.0.1:{node_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def scrape() -> str:
            try:
                return get(f"http://127.0.0.1:{node_port}/metrics", 2).decode()
            except OSError:
                return ""

        assert wait_until(lambda: "node_textfile_scrape_error" in scrape(), 20, 0.2)
        body = scrape()
    finally:
        node.terminate()
        node.wait(10)
    assert "node_textfile_scrape_error 0" in body, body[-2000:]
    assert f'acceptrace_connections_total{{event="accepted",namespace="netns:{ns}"' in body


@pytest.mark.root
def test_bad_input_is_one_line_and_exit_2(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], check=True)
    try:
        for args, want in (
            (["--listen", f"127.0.0.1:{port}"], f"--listen 127.0.0.1:{port}: cannot listen "
                                                "(Address already in use)"),
            (["--listen", "nonsense"], "--listen must be ADDRESS:PORT"),
            (["--listen", "example.org:80"], "is not an IP address"),
            (["--textfile", str(ro / "a.prom")], f"cannot write in {ro} (Read-only file system)"),
            (["--textfile", str(tmp_path / "missing" / "a.prom")], "No such file or directory"),
            (["--buckets-per-octave", "3"], "Invalid value for '--buckets-per-octave'"),
        ):
            res = run_cli("export", "--port", "8000", *args, timeout=60)
            assert res.returncode == 2, (args, res.stderr)
            lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
            assert len(lines) == 1 and want in lines[0], (args, res.stderr)
            assert "Traceback" not in res.stderr
    finally:
        subprocess.run(["umount", str(ro)], check=False)
        busy.close()


def test_listen_addresses():
    from acceptrace.errors import UserError
    from acceptrace.runner import parse_listen

    assert parse_listen("127.0.0.1:19435") == ("127.0.0.1", 19435)
    assert parse_listen("[::]:9") == ("::", 9)
    assert parse_listen("localhost:0") == ("127.0.0.1", 0)
    for bad in ("19435", ":19435", "host.example:1", "127.0.0.1:x", "127.0.0.1:70000"):
        with pytest.raises(UserError):
            parse_listen(bad)


def test_a_scrape_waits_for_a_fresh_read_but_not_for_long():
    """A scrape from another thread asks the loop for a fresh read and takes it; if the
    loop is busy, it gets the last view after wait_s; the loop itself never waits."""
    from acceptrace.metrics import ExportView
    from acceptrace.model import Run
    from acceptrace.runner import ExportState

    state = ExportState(fresh_s=0.0, wait_s=5.0)
    old, new = ExportView(Run.new(1, "x")), ExportView(Run.new(2, "x"))
    state.publish(old)
    assert state.get() is old  # the loop's own thread
    got: list = []
    th = threading.Thread(target=lambda: got.append(state.get()))
    th.start()
    assert wait_until(lambda: state.wanted, 5)
    state.publish(new)
    th.join(5)
    assert got == [new] and not state.wanted
    state.wait_s = 0.2
    th = threading.Thread(target=lambda: got.append(state.get()))
    th.start()
    th.join(scaled(30))  # (a harness bound; it returns after wait_s)
    assert not th.is_alive() and got[-1] is new  # nobody read afresh: the last view
