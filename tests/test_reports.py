"""Views rendered from a recorded run (no root): report, compare, dashboard, HTML.

tests/fixtures/run-demo-overflow.json is a real `acceptrace demo` run: the
accept queue (backlog 8) overflowed 318 times.
"""

from __future__ import annotations

import copy
import re
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest
from acceptrace.dashboard import DashboardState, explain_text, render_dashboard
from acceptrace.html import render_html
from acceptrace.model import Run
from acceptrace.render import render_compare, render_report, to_text

FIXTURE = Path(__file__).parent / "fixtures" / "run-demo-overflow.json"


@pytest.fixture(scope="module")
def run() -> Run:
    return Run.read(FIXTURE)


def test_report_text(run):
    text = to_text(render_report(run), 400)
    overflow = run.drops["listen_overflow"]
    assert f"accept queue overflowed {overflow:,} times (backlog 8)" in text
    assert "the server is not calling accept() fast enough" in text
    assert "SYNs were dropped" in text and "listen backlog is only 8" in text
    for stage in run.stages:
        assert f"{stage} histogram" in text
    assert "accept-queue depth histogram" in text


def test_compare_two_runs(run):
    after = copy.deepcopy(run)
    after.drops["listen_overflow"] = 0
    after.queues.backlog = 2048
    text = to_text(render_compare(run, after, ("backlog8.json", "backlog2048.json")), 120)
    assert "backlog8.json" in text and "backlog2048.json" in text
    row = next(ln for ln in text.splitlines() if "drops.listen_overflow" in ln)
    n = f"{run.drops['listen_overflow']:,}"
    assert n in row and f"-{n}" in row
    assert "-100%" in row
    backlog = next(ln for ln in text.splitlines() if "queues.backlog" in ln)
    assert "+2,040" in backlog
    assert "p99.9" in text and "accept_queue" in text


@pytest.mark.parametrize("width, height", [(80, 24), (120, 50)])
def test_dashboard_fits_the_terminal(run, width, height):
    iv = run.intervals[len(run.intervals) // 2]
    text = to_text(render_dashboard(run, iv, DashboardState(), height), width)
    lines = text.rstrip("\n").splitlines()
    assert len(lines) <= height
    assert max(len(ln) for ln in lines) <= width
    for needle in ("SYN", "handshake", "accept queue", "accept()", "read", "conn/s",
                   "OVERFLOW", "max 9 / 8", "listen overflows", f"{run.drops['listen_overflow']}"):
        assert needle in text, needle
    if height >= 40:
        assert "accept_queue histogram" in text  # the stage that dominates
        assert str(run.processes[0].pid) in text


def test_dashboard_keys_change_the_view(run):
    state = DashboardState()
    state.next_hist(run)
    assert state.hist_stage != "accept_queue"
    text = to_text(render_dashboard(run, run.intervals[-1], state, 50), 120)
    assert f"{state.hist_stage} histogram" in text
    state.explain = True
    text = to_text(render_dashboard(run, run.intervals[-1], state, 50), 120)
    assert "what the figures mean" in text and "somaxconn" in text


def test_explain_covers_every_figure():
    text = explain_text()
    for fig in ("SYN", "handshake", "accept queue", "read", "accept-queue gauge",
                "SYN-queue gauge", "listen overflows", "SYNs dropped", "SYN-ACK retransmits",
                "syncookies", "processes"):
        assert f"{fig}\n" in text, fig


def test_html_is_self_contained(run):
    html = render_html(run)
    assert "default-src 'none'" in html
    assert not re.search(r"https?://|<script|<link|<img|@import|url\(", html)
    assert html.count('data-plot="histogram"') == sum(1 for h in run.stages.values() if h.count)
    assert 'data-plot="rate"' in html and 'data-plot="depth"' in html
    assert 'data-plot="drops"' in html


# Chromium's own service traffic (clock, updates, accounts), present even on
# about:blank despite the --disable-* flags: not made by the page.
CHROMIUM_OWN = re.compile(r"(^|\.)(google\.com|googleapis\.com|gvt1\.com|gstatic\.com)$")


class TrapProxy:
    """A listening socket given to Chromium as its proxy: every request goes
    here, and its target host is recorded."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.hosts: list[str] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            conn.settimeout(2)
            try:
                first = conn.recv(4096).split(b"\r\n")[0].decode(errors="replace")
            except OSError:
                first = "? ?"
            conn.close()
            target = first.split(" ")[1] if " " in first else first
            host = re.sub(r"^[a-z]+://", "", target).split("/")[0].rsplit(":", 1)[0]
            self.hosts.append(host)

    def page_hosts(self) -> list[str]:
        return [h for h in self.hosts if not CHROMIUM_OWN.search(h)]

    def close(self) -> None:
        self._stop.set()
        self._t.join()
        self.sock.close()


def chromium(*args: str, proxy: int) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium is needed for the HTML report test (make setup installs it)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--proxy-server=http://127.0.0.1:{proxy}",
             "--proxy-bypass-list=<-loopback>"]
    return subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=120)


def test_trap_proxy_sees_a_page_request(tmp_path):
    """Positive control: a page that does load something is caught."""
    page = tmp_path / "leaky.html"
    page.write_text('<html><body><img src="http://leak.example.invalid/x.png"></body></html>')
    trap = TrapProxy()
    try:
        chromium(f"--user-data-dir={tmp_path / 'p'}", "--dump-dom", page.as_uri(),
                 proxy=trap.sock.getsockname()[1])
    finally:
        trap.close()
    assert "leak.example.invalid" in trap.page_hosts()


def test_html_renders_in_chromium(run, tmp_path):
    from PIL import Image

    page = tmp_path / "report.html"
    page.write_text(render_html(run))
    trap = TrapProxy()
    try:
        dom = chromium(f"--user-data-dir={tmp_path / 'p1'}", "--dump-dom", page.as_uri(),
                       proxy=trap.sock.getsockname()[1]).stdout
        shot = tmp_path / "shot.png"
        chromium(f"--user-data-dir={tmp_path / 'p2'}", "--window-size=1200,2000",
                 f"--screenshot={shot}", page.as_uri(), proxy=trap.sock.getsockname()[1])
    finally:
        trap.close()
    assert trap.page_hosts() == [], f"the report page made requests: {trap.page_hosts()}"
    # The browser parsed every plot: one bar per non-empty bucket of each stage.
    bars = sum(len(h.nonempty_buckets()) for h in run.stages.values())
    assert dom.count('class="bar"') == bars
    assert dom.count("<polyline") == 2
    measured = [i for i in run.intervals if i.listen_overflow is not None]
    assert dom.count('class="drop"') == len(measured)
    # ...and painted them: the screenshot has the bar and overflow colours.
    img = Image.open(shot).convert("RGB")
    colours = {c for _n, c in img.getcolors(maxcolors=1 << 20)}
    assert (123, 97, 201) in colours   # .bar  #7b61c9
    assert (208, 69, 58) in colours    # .drop #d0453a
    assert (11, 92, 173) in colours    # .line #0b5cad


def several(run: Run) -> Run:
    """The fixture as a run of three listeners: itself (overflowing) and two quiet ones."""
    mid = run.intervals[len(run.intervals) // 2]
    quiet = []
    for port in (9001, 9002):
        q = copy.deepcopy(run)
        q.meta.port = port
        q.drops = dict.fromkeys(q.drops, 0)
        for lst in q.queues.listeners:
            lst.port = port
        q.recent = copy.deepcopy(mid)
        q.recent.listen_overflow = 0
        quiet.append(q)
    hot = copy.deepcopy(run)
    hot.recent = copy.deepcopy(mid)
    top = copy.deepcopy(run)
    top.meta.all_listeners = True
    top.targets = [hot, *quiet]
    return top


def test_dashboard_listener_table_and_selection(run):
    top = several(run)
    state = DashboardState()
    text = to_text(render_dashboard(top, top.recent, state, 30), 120)
    assert "listeners, worst first" in text and "3 listeners" in text
    rows = [ln for ln in text.splitlines() if ":9001" in ln or ":9002" in ln
            or f":{run.meta.port}" in ln]
    assert f":{run.meta.port}" in rows[0]  # the overflowing one first
    state.move(top, 1)
    state.enter(top)
    assert state.selected is not None and state.selected[1] in (9001, 9002)
    one = to_text(render_dashboard(top, top.recent, state, 30), 120)
    assert f"port {state.selected[1]}" in one and "listeners, worst first" not in one
    state.back()
    assert "listeners, worst first" in to_text(render_dashboard(top, top.recent, state, 30), 120)


def test_report_of_several_listeners_and_compare_by_listener(run):
    from acceptrace.render import render_compare_listeners, render_summary

    top = several(run)
    text = to_text(render_summary(top), 140)
    assert "listeners, worst first" in text and "totals over the listeners" in text
    after = copy.deepcopy(top)
    after.targets = after.targets[:2]
    cmp = to_text(render_compare_listeners(top, after), 140)
    assert "port 9001" in cmp and "only in before" in cmp
    diag = to_text(render_report(top), 200)
    assert f":{run.meta.port}: accept queue overflowed" in diag


def test_views_name_the_server_and_the_response(run):
    """A run whose accepting processes were recognised, with the response stage: every
    view names the server, and the summary the new stage and its count."""
    from acceptrace import listeners
    from acceptrace.hist import Histogram

    r = copy.deepcopy(run)
    for p in r.processes:
        p.server, p.worker_class = "gunicorn", "sync"
    h = Histogram.empty("us")
    for v in (101_000, 103_000, 250_000):
        h.add(v)
    r.stages["read_to_response"] = h
    r.connections["responded"] = 3
    for s in r.slowest:
        s.read_to_response_us = 250_000.0
    back = Run.from_json(r.to_json())
    assert back.processes[0].server == "gunicorn" and back.processes[0].worker_class == "sync"
    text = to_text(render_report(back), 200)
    assert "server gunicorn (sync)" in text.splitlines()[0]
    assert "responded 3" in text and "read_to_response" in text
    assert "first read → first byte written back" in text
    assert "read→resp" in text and "250 ms" in text
    assert "served by gunicorn (worker class sync)" in text and "--backlog" in text
    assert "uvicorn's default" not in text
    dash = to_text(render_dashboard(back, back.intervals[-1], DashboardState(), 24), 80)
    assert "· gunicorn ·" in dash.splitlines()[0] and "response" in dash
    assert listeners.row(back).processes.startswith("gunicorn")
    assert "<td>gunicorn (sync)</td>" in render_html(back)
    # --explain says what the response stage is, keep-alive included
    assert "first request of each connection only" in explain_text()
    # a report written before servers were recognised: no server anywhere, no error
    old = Run.from_json(run.to_json())
    assert old.server() is None and "server " not in to_text(render_report(old), 200)[:80]


# -- the picture a report opens with: where a p50 and a p99 connection spent its time --------

def fixed_run(run: Run) -> Run:
    """The fixture "after a fix": every stage (dispatch ones too) a known, short time."""
    from acceptrace.hist import Histogram

    after = copy.deepcopy(run)
    for stage, us in (("handshake", 30), ("accept_queue", 2_000), ("accept_to_read", 500),
                      ("read_to_dispatch", 50), ("dispatch_to_response", 20_000)):
        h = Histogram.empty("us")
        for _ in range(200):
            h.add(us)
        after.stages[stage] = h
    return after


FLOW_RECT = re.compile(r'<rect class="seg" x="([\d.]+)" y="(\d+)" width="([\d.]+)"[^>]*'
                       r'data-run="([^"]+)" data-q="(p\d+)" data-stage="(\w+)" data-us="([\d.]+)"')


def flow_rects(html: str) -> list[tuple[float, int, float, str, str, str, float]]:
    return [(float(x), int(y), float(w), r, q, s, float(us))
            for x, y, w, r, q, s, us in FLOW_RECT.findall(html)]


def one_scale(rects: list[tuple[float, int, float, str, str, str, float]]) -> bool:
    """Pixels per µs the same for every segment wide enough to tell (widths are written
    to 0.01 px)."""
    ratios = [w / us for _x, _y, w, _r, _q, _s, us in rects if w >= 5]
    return bool(ratios) and max(ratios) <= min(ratios) * 1.01


def test_html_opens_with_the_flow_bars(run):
    from acceptrace.html import FLOW

    html = render_html(run)
    assert html.index('data-plot="flow"') < html.index("<h2>Diagnosis</h2>")
    rects = flow_rects(html)
    order = [s for s, _l, _c in FLOW]
    for q in ("p50", "p99"):
        row = [r for r in rects if r[4] == q]
        assert [r[5] for r in row] == [s for s in order if run.stages.get(s) is not None
                                      and run.stages[s].count]   # flow order, measured ones
        for (x, _y, w, *_rest), nxt in zip(row, row[1:]):
            assert nxt[0] == pytest.approx(x + w, abs=0.02)       # stacked end to end
        assert one_scale(row)                                     # one time scale per bar
        h = run.stages[row[1][5]]
        assert row[1][6] == pytest.approx(h.percentile(0.5 if q == "p50" else 0.99), abs=0.1)


def test_html_compare_bars_one_above_the_other(run):
    from acceptrace.html import render_html_compare

    after = fixed_run(run)
    html = render_html_compare(run, after, ("before", "after"))
    rects = flow_rects(html)
    for q in ("p50", "p99"):
        b = [r for r in rects if r[4] == q and r[3] == "before"]
        a = [r for r in rects if r[4] == q and r[3] == "after"]
        assert b and a and b[0][1] < a[0][1]                      # before above after
        assert one_scale(b + a)   # the two bars of a quantile: widths proportional to time
    assert [r[5] for r in rects if r[3] == "after" and r[4] == "p50"] == [
        "handshake", "accept_queue", "accept_to_read", "read_to_dispatch",
        "dispatch_to_response"]
    assert "Content-Security-Policy" in html and "<script" not in html


def test_flow_bars_are_painted_in_chromium(run, tmp_path):
    """Headless Chromium draws the comparison: each bar's segments in their colours,
    where the SVG puts them (to a pixel or two), the "before" bars above the "after"."""
    from acceptrace.html import FLOW, render_html_compare
    from PIL import Image

    after = fixed_run(run)
    html = render_html_compare(run, after, ("before", "after"))
    page = tmp_path / "compare.html"
    page.write_text(html)
    shot = tmp_path / "flow.png"
    trap = TrapProxy()
    try:
        chromium(f"--user-data-dir={tmp_path / 'p'}", "--window-size=1100,560",
                 "--force-device-scale-factor=1", f"--screenshot={shot}", page.as_uri(),
                 proxy=trap.sock.getsockname()[1])
    finally:
        trap.close()
    img = Image.open(shot).convert("RGB")
    px = img.load()
    width, height = img.size
    colour = {s: tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for s, _l, c in FLOW}

    def extent(rgb: tuple[int, ...]) -> dict[int, tuple[int, int]]:
        """y -> (first x, last x) of the pixels of exactly this colour on that row."""
        rows: dict[int, tuple[int, int]] = {}
        for y in range(height):
            xs = [x for x in range(width) if px[x, y] == rgb]
            if xs:
                rows[y] = (xs[0], xs[-1])
        return rows

    svg_left = None
    offsets: list[tuple[int, int]] = []   # (y in the SVG, top of the painted band)
    for x0, y0, w, name, q, stage, _us in flow_rects(html):
        if w < 4:
            continue   # a sliver: antialiased, no pixel need be exactly its colour
        rows = extent(colour[stage])
        assert rows, f"{stage} ({name} {q}) not painted"
        if svg_left is None:
            # the SVG's left edge on the page, from the first wide segment
            svg_left = rows[min(rows)][0] - round(x0)
        lo, hi = svg_left + x0, svg_left + x0 + w
        band = [y for y, (a, b) in rows.items() if abs(a - lo) <= 2 and abs(b + 1 - hi) <= 2]
        # the segment is painted at its x and width, its full height, one band of rows
        # (a segment of the same colour and x-range in another bar is another band)
        bands = [[band[0]]] if band else []
        for y in band[1:]:
            if y == bands[-1][-1] + 1:
                bands[-1].append(y)
            else:
                bands.append([y])
        assert any(len(bd) >= 24 for bd in bands), (name, q, stage, lo, hi, bands)
        tops = [bd[0] for bd in bands if len(bd) >= 24]
        # of the bands that fit, the one where this bar's row is (the offset of the
        # first one painted fixes where the SVG is)
        top = min(tops, key=lambda t: abs((t - y0) - (offsets[0][1] - offsets[0][0]))
                  if offsets else 0)
        offsets.append((y0, top))
    # every bar is painted where the SVG put it: one vertical offset for all, so the
    # "before" bars (smaller y in the SVG) are above the "after" ones on the screen
    assert len({top - y0 for y0, top in offsets}) <= 2, offsets
    assert len({y0 for y0, _t in offsets}) == 4   # four bars: 2 runs x p50, p99
