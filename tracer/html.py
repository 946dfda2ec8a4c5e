"""`acceptrace report RUN.json --html FILE`: one self-contained HTML page; with two
runs (``report A.json B.json --html FILE``, the lab's report.html) a comparison.
Each opens with where a p50 and a p99 connection spent its time, stage by stage.

Inline CSS and SVG only: no script, no font, no image, no request leaves the
page (a Content-Security-Policy of default-src 'none' says so to the browser).
"""

from __future__ import annotations

import math
from html import escape

from .diagnose import diagnose
from .hist import Histogram
from .model import Meta, Run
from .words import DROP_MEANING, STAGE_MEANING, fmt_count, fmt_server, fmt_us

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1d232a;max-width:1100px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px}
.meta{color:#555} table{border-collapse:collapse;margin:6px 0}
td,th{padding:3px 10px;border-bottom:1px solid #e3e6ea;text-align:right}
td:first-child,th:first-child{text-align:left} th{background:#f4f6f8}
.crit{color:#b3261e;font-weight:600} .warn{color:#9a6700} .info{color:#0b5cad}
.charts{display:flex;flex-wrap:wrap;gap:18px} figure{margin:0}
figcaption{font-size:13px;color:#444} svg text{font:11px system-ui,sans-serif;fill:#444}
.bar{fill:#7b61c9} .line{fill:none;stroke:#0b5cad;stroke-width:2} .drop{fill:#d0453a}
.axis{stroke:#999;stroke-width:1} .limit{stroke:#d0453a;stroke-dasharray:4 3}
.flow text{font:12px system-ui,sans-serif;fill:#1d232a} .flow .dim{fill:#666}
.cols{display:flex;gap:24px} .cols>div{flex:1} .sub{color:#444;margin:2px 0 10px}
"""
W, H, PAD_L, PAD_B, PAD_T, PAD_R = 460, 200, 48, 28, 12, 30
SEVERITY_CLASS = {"critical": "crit", "warning": "warn", "info": "info"}


def _svg(body: str, label: str, kind: str) -> str:
    return (f'<svg class="plot" data-plot="{escape(kind)}" role="img" aria-label="{escape(label)}"'
            f' width="{W}" height="{H}" viewBox="0 0 {W} {H}">'
            f"{body}</svg>")


def _axes(xticks: list[tuple[float, str]], ymax: float, yspec: str = ",.0f") -> str:
    x0, y0, x1, y1 = PAD_L, H - PAD_B, W - PAD_R, PAD_T
    out = [f'<line class="axis" x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}"/>',
           f'<line class="axis" x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}"/>']
    for x, label in xticks:
        out.append(f'<line class="axis" x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y0 + 4}"/>'
                   f'<text x="{x:.1f}" y="{y0 + 16}" text-anchor="middle">{escape(label)}</text>')
    for frac in (0.5, 1.0):
        y = y0 - frac * (y0 - y1)
        out.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end">'
                   f"{escape(format(ymax * frac, yspec))}</text>")
    return "".join(out)


def hist_svg(name: str, h: Histogram) -> str:
    """Bars of the non-empty buckets on a log10 time (or depth) axis."""
    buckets = h.nonempty_buckets()
    lo_all = max(1.0, float(buckets[0][0]))
    hi_all = float(buckets[-1][1])
    d0, d1 = math.floor(math.log10(lo_all)), math.ceil(math.log10(hi_all))
    if d1 <= d0:
        d1 = d0 + 1
    span_px = W - PAD_L - PAD_R

    def x(v: float) -> float:
        return PAD_L + (math.log10(max(v, 10.0**d0)) - d0) / (d1 - d0) * span_px

    peak = max(c for _, _, c in buckets)
    y0, top = H - PAD_B, PAD_T
    bars = []
    for lo, hi, c in buckets:
        xa, xb = x(max(lo, 10.0**d0)), x(hi)
        hgt = (y0 - top) * c / peak
        bars.append(f'<rect class="bar" x="{xa:.2f}" y="{y0 - hgt:.2f}" '
                    f'width="{max(1.0, xb - xa):.2f}" height="{hgt:.2f}" data-count="{c}">'
                    f"<title>{escape(_bound(lo, h.unit))}–{escape(_bound(hi, h.unit))}: {c}"
                    f"</title></rect>")
    ticks = [(x(10.0**d), _bound(10.0**d, h.unit)) for d in range(d0, d1 + 1)]
    return _svg(_axes(ticks, peak) + "".join(bars), f"{name} histogram", "histogram")


def _bound(v: float, unit: str) -> str:
    return fmt_us(v) if unit == "us" else f"{v:,.0f}"


def series_svg(title: str, kind: str, points: list[tuple[float, float | None]],
               bars: bool = False, limit: float | None = None) -> str:
    """A time series over the run's intervals (t in seconds)."""
    pts = [(t, v) for t, v in points if v is not None]
    if not pts:
        return ""
    tmax = max(t for t, _ in pts) or 1.0
    vmax = max([v for _, v in pts] + ([limit] if limit else []) + [1.0])
    y0, top = H - PAD_B, PAD_T

    def x(t: float) -> float:
        return PAD_L + t / tmax * (W - PAD_L - PAD_R)

    def y(v: float) -> float:
        return y0 - v / vmax * (y0 - top)

    body = []
    if bars:
        bw = max(1.0, (W - PAD_L - PAD_R) / max(1, len(pts)) * 0.8)
        for t, v in pts:
            body.append(f'<rect class="drop" x="{x(t) - bw:.2f}" y="{y(v):.2f}" width="{bw:.2f}" '
                        f'height="{y0 - y(v):.2f}" data-value="{v:g}"/>')
    else:
        path = " ".join(f"{x(t):.2f},{y(v):.2f}" for t, v in pts)
        body.append(f'<polyline class="line" points="{path}" data-points="{len(pts)}"/>')
    if limit is not None:
        body.append(f'<line class="limit" x1="{PAD_L}" x2="{W - PAD_R}" y1="{y(limit):.2f}" '
                    f'y2="{y(limit):.2f}"><title>backlog {limit:g}</title></line>')
    ticks = [(x(tmax * f), f"{tmax * f:.0f} s") for f in (0, 0.5, 1)]
    return _svg(_axes(ticks, vmax) + "".join(body), title, kind)


Series = tuple[str, str, list[tuple[float, float | None]], bool, float | None]


def _series(run: Run) -> list[Series]:
    """The per-interval plots: (title, kind, points, bars?, limit line)."""
    ivs = run.intervals
    return [
        ("connections accepted per second", "rate",
         [(i.t_s, i.accepted / i.duration_s if i.duration_s > 0 else None) for i in ivs],
         False, None),
        ("accept-queue depth (max per interval) vs backlog", "depth",
         [(i.t_s, i.accept_queue_depth_max) for i in ivs], False,
         float(run.queues.backlog) if run.queues.backlog is not None else None),
        ("listen overflows per interval", "drops",
         [(i.t_s, i.listen_overflow) for i in ivs], True, None),
    ]


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


# The stages a connection goes through, in the order of the flow (docs/schema.md), with
# the colour of each one's segment in the picture that opens a report.
FLOW: tuple[tuple[str, str, str], ...] = (
    ("handshake", "SYN queue (handshake)", "#4c78c8"),
    ("accept_queue", "accept queue", "#d0453a"),
    ("accept_to_read", "accept() → first read", "#e8a33d"),
    ("read_to_dispatch", "first read → dispatch", "#3f9e6a"),
    ("dispatch_to_response", "dispatch → response", "#7b61c9"),
)
FLOW_W, FLOW_LABEL, FLOW_RIGHT, FLOW_BAR, FLOW_GAP = 1000, 200, 110, 26, 8
FLOW_QUANTILES = ((0.5, "p50", "a typical connection"), (0.99, "p99", "a slow connection"))


def flow_segments(run: Run, q: float) -> list[tuple[str, str, str, float]]:
    """(stage, label, colour, µs) of each stage the run measured, in flow order: that
    stage's own q-quantile."""
    out = []
    for stage, label, colour in FLOW:
        h = run.stages.get(stage)
        v = h.percentile(q) if h is not None and h.count else None
        if v is not None:
            out.append((stage, label, colour, float(v)))
    return out


def flow_svg(runs: list[tuple[str, Run]]) -> str:
    """Where a p50 and a p99 connection spent its time: one stacked bar per run and
    quantile, stages in flow order; the runs of a quantile one above the other on one
    time scale (the p99 rows on their own)."""
    rows: list[str] = []
    y = 4
    for q, qname, words in FLOW_QUANTILES:
        segs = [(name, flow_segments(run, q)) for name, run in runs]
        scale_us = max([sum(v for *_, v in sg) for _, sg in segs] + [1.0])
        px = (FLOW_W - FLOW_LABEL - FLOW_RIGHT) / scale_us
        rows.append(f'<text x="0" y="{y + 14}" font-weight="600">{qname}: {escape(words)}'
                    "</text>")
        y += 22
        for name, sg in segs:
            x = float(FLOW_LABEL)
            rows.append(f'<text x="{FLOW_LABEL - 8}" y="{y + FLOW_BAR / 2 + 4:.0f}" '
                        f'text-anchor="end">{escape(name)}</text>')
            for stage, label, colour, v in sg:
                w = v * px
                rows.append(
                    f'<rect class="seg" x="{x:.2f}" y="{y}" width="{w:.2f}" height="{FLOW_BAR}" '
                    f'fill="{colour}" data-run="{escape(name)}" data-q="{qname}" '
                    f'data-stage="{stage}" data-us="{v:.1f}">'
                    f"<title>{escape(name)} {qname} {escape(label)}: {escape(fmt_us(v))}"
                    "</title></rect>")
                x += w
            total = sum(v for *_, v in sg)
            rows.append(f'<text class="dim" x="{x + 6:.2f}" y="{y + FLOW_BAR / 2 + 4:.0f}">'
                        f"{escape(fmt_us(total) if sg else 'no connections')}</text>")
            y += FLOW_BAR + FLOW_GAP
        y += 10
    lx = 0.0
    for _stage, label, colour in FLOW:
        rows.append(f'<rect x="{lx:.0f}" y="{y}" width="12" height="12" fill="{colour}"/>'
                    f'<text x="{lx + 16:.0f}" y="{y + 11}">{escape(label)}</text>')
        lx += 16 + 7.2 * len(label) + 18
    y += 18
    return (f'<svg class="flow" data-plot="flow" role="img" width="{FLOW_W}" height="{y}" '
            f'viewBox="0 0 {FLOW_W} {y}" aria-label="where a p50 and a p99 connection spent '
            f'its time, stage by stage">{"".join(rows)}</svg>')


FLOW_CAPTION = (
    "SYN queue → accept queue → accept() → first read → dispatch → response. Each segment "
    "is that stage's own p50 (p99) over the run's connections, laid end to end: a "
    "connection at the median of one stage need not be at the median of the next. Stages "
    "this backend or server could not measure are left out.")


def _flow_figure(runs: list[tuple[str, Run]]) -> str:
    return (f"<h2>Where the time went</h2><figure>{flow_svg(runs)}"
            f"<figcaption>{escape(FLOW_CAPTION)}</figcaption></figure>")


def _head(title: str) -> str:
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
            "style-src 'unsafe-inline'\">"
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body>")


def _meta_line(m: Meta) -> str:
    return (f'<p class="meta">{escape(m.started)} · {m.duration_s:.1f} s · backend '
            f"{escape(m.backend)} · kernel {escape(m.kernel)} · host {escape(m.hostname)}</p>")


def _findings_html(run: Run, slowness: float = 1.0) -> str:
    return "<ul>" + "".join(f'<li class="{SEVERITY_CLASS[f.severity]}">{escape(f.text)}</li>'
                            for f in diagnose(run, slowness)) + "</ul>"


def render_html(run: Run) -> str:
    m = run.meta
    parts = [
        _head(f"acceptrace: port {m.port}"),
        f"<h1>acceptrace — port {m.port}</h1>",
        _meta_line(m),
        _flow_figure([("this run", run)]),
        "<h2>Diagnosis</h2>",
        _findings_html(run),
    ]
    parts.append("<h2>Stages</h2>")
    rows = []
    for name, h in run.stages.items():
        if h is None:
            rows.append([name, "n/a", *["n/a"] * 6, STAGE_MEANING.get(name, "")])
            continue
        rows.append([name, fmt_count(h.count), fmt_us(h.min), fmt_us(h.percentile(0.5)),
                     fmt_us(h.percentile(0.9)), fmt_us(h.percentile(0.99)),
                     fmt_us(h.percentile(0.999)), fmt_us(h.max), STAGE_MEANING.get(name, "")])
    parts.append(_table(["stage", "count", "min", "p50", "p90", "p99", "p99.9", "max", "what"],
                        rows))
    parts.append('<div class="charts">')
    for name, h in run.stages.items():
        if h is not None and h.count:
            parts.append(f"<figure>{hist_svg(name, h)}<figcaption>{escape(name)}: "
                         f"{escape(STAGE_MEANING.get(name, ''))} (log time axis)</figcaption>"
                         "</figure>")
    parts.append("</div><h2>Over time</h2><div class=\"charts\">")
    for title, kind, pts, bars, limit in _series(run):
        svg = series_svg(title, kind, pts, bars, limit)
        if svg:
            parts.append(f"<figure>{svg}<figcaption>{escape(title)}</figcaption></figure>")
    parts.append("</div><h2>Drops</h2>")
    parts.append(_table(["drop", "count", "meaning"],
                        [[k, fmt_count(v), DROP_MEANING.get(k, "")] for k, v in run.drops.items()]))
    parts.append(_table(["kernel counter (Δ over the run)", "value"],
                        [[k, f"{v:,}"] for k, v in run.kernel_counters.items()]))
    q = run.queues
    parts.append("<h2>Queues</h2>")
    dq = q.accept_queue_depth
    parts.append(_table(["", "value"], [
        ["backlog", fmt_count(q.backlog)],
        ["accept-queue depth max", fmt_count(int(dq.max) if dq and dq.max is not None else None)],
        ["SYN-queue length max", fmt_count(int(q.syn_queue_depth.max)
                                           if q.syn_queue_depth and q.syn_queue_depth.max
                                           is not None else None)],
    ]))
    parts.append("<h2>Processes</h2>")
    parts.append(_table(["pid", "comm", "server", "accepted"],
                        [[str(p.pid), p.comm, fmt_server(p.server, p.worker_class),
                          f"{p.accepted:,}"] for p in run.processes]))
    parts.append("<h2>Slowest connections</h2>")
    parts.append(_table(
        ["client", "pid", "handshake", "accept queue", "SYN→accept", "accept→read",
         "read→response", "total"],
        [[f"{s.saddr}:{s.sport}", str(s.pid or "-"), fmt_us(s.handshake_us),
          fmt_us(s.accept_queue_us), fmt_us(s.syn_to_accept_us), fmt_us(s.accept_to_read_us),
          fmt_us(s.read_to_response_us), fmt_us(s.total_us)] for s in run.slowest]))
    parts.append("</body></html>\n")
    return "".join(parts)



def render_html_compare(a: Run, b: Run, names: tuple[str, str] = ("before", "after"),
                        title: str = "", subtitle: str = "",
                        slowness: tuple[float, float] = (1.0, 1.0)) -> str:
    """Two runs on one page (``report A.json B.json --html``, the lab's report.html):
    the flow bars of both one above the other, both diagnoses (``slowness``: each run's
    machine, as diagnose takes it), the stages and counters side by side."""
    title = title or f"acceptrace — {names[0]} and {names[1]}"
    parts = [_head(title), f"<h1>{escape(title)}</h1>"]
    if subtitle:
        parts.append(f'<p class="sub">{escape(subtitle)}</p>')
    for name, r in zip(names, (a, b)):
        parts.append(f'<p class="meta">{escape(name)}: port {r.meta.port}'
                     f"{' · ' + escape(str(r.meta.netns.get('name'))) if r.meta.netns else ''}"
                     f" · {escape(r.meta.started)} · {r.meta.duration_s:.1f} s · backend "
                     f"{escape(r.meta.backend)} · kernel {escape(r.meta.kernel)}</p>")
    parts.append(_flow_figure([(names[0], a), (names[1], b)]))
    parts.append('<h2>Diagnosis</h2><div class="cols">')
    for name, r, slow in zip(names, (a, b), slowness):
        parts.append(f"<div><h3>{escape(name)}</h3>{_findings_html(r, slow)}</div>")
    parts.append("</div><h2>Stages</h2>")
    rows = []
    for stage in dict.fromkeys([*a.stages, *b.stages]):
        ha, hb = a.stages.get(stage), b.stages.get(stage)
        if (ha is None or not ha.count) and (hb is None or not hb.count):
            continue
        cells = [stage]
        for h in (ha, hb):
            cells += ([fmt_count(h.count), fmt_us(h.percentile(0.5)), fmt_us(h.percentile(0.99))]
                      if h is not None else ["n/a"] * 3)
        rows.append(cells)
    parts.append(_table(["stage", f"{names[0]} count", "p50", "p99", f"{names[1]} count", "p50",
                         "p99"], rows))
    parts.append("<h2>Counters</h2>")
    rows = []
    for section, da, db in (("connections", a.connections, b.connections),
                            ("drops", a.drops, b.drops),
                            ("kernel", a.kernel_counters, b.kernel_counters)):
        for k in dict.fromkeys([*da, *db]):
            rows.append([f"{section}.{k}", fmt_count(da.get(k)), fmt_count(db.get(k))])
    rows.append(["queues.backlog", fmt_count(a.queues.backlog), fmt_count(b.queues.backlog)])
    parts.append(_table(["counter", names[0], names[1]], rows))
    parts.append("<h2>Over time</h2>")
    for name, r in zip(names, (a, b)):
        parts.append(f"<h3>{escape(name)}</h3><div class=\"charts\">")
        for t, kind, pts, bars, limit in _series(r):
            svg = series_svg(t, kind, pts, bars, limit)
            if svg:
                parts.append(f"<figure>{svg}<figcaption>{escape(t)}</figcaption></figure>")
        parts.append("</div>")
    parts.append("</body></html>\n")
    return "".join(parts)
