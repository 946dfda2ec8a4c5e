"""How a trace ends, in a terminal and in a pipe: the summary, then the diagnosis as the
last word; the notes said at the start are not said again.  `acceptrace demo` in a
terminal shows the live dashboard (what `make demo` runs).  Each in a namespace of its
own (`ip netns exec`: acceptrace, its server and its clients all inside)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import backend_args, scaled, wait_until
from helpers import ACCEPTRACE, ScratchNamespace

pytestmark = pytest.mark.root


def notes_once(text: str) -> None:
    """Every note appears once in the whole output."""
    notes = re.findall(r"note: (.{20,60})", text)
    assert notes, text
    for n in set(notes):
        assert text.count(n) == 1, (n, text)


def last_words(text: str) -> list[str]:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[lines.index(next(ln for ln in reversed(lines) if ln.startswith("diagnosis"))):]


def test_trace_summary_ends_with_the_diagnosis(tmp_path):
    server = ("import socket,sys,time\n"
              "s=socket.socket(); s.bind(('127.0.0.1', 8000)); s.listen(2)\n"
              "time.sleep(60)\n")   # never accepts: the queue of 2 overflows
    clients = ("import socket\n"
               "cs=[]\n"
               "for _ in range(8):\n"
               "    c=socket.socket(); c.setblocking(False); c.connect_ex(('127.0.0.1', 8000))"
               "; cs.append(c)\n"
               "import time; time.sleep(1.5)\n")
    with ScratchNamespace() as ns:
        srv = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", server])
        time.sleep(0.5)
        t = subprocess.Popen(["ip", "netns", "exec", ns, *ACCEPTRACE, "--port", "8000",
                              "--duration", "4", *backend_args()],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(scaled(2.5))   # started (a start takes ~1-3 s here)
        subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", clients], timeout=30)
        out, err = t.communicate(timeout=scaled(60))
        srv.kill()
        srv.wait()
    assert t.returncode == 0, err
    words = last_words(out)
    assert words[0] == "diagnosis" and "accept queue overflowed" in words[1], out[-2000:]
    assert out.rstrip().endswith(words[-1])
    notes_once(out + err)


def test_demo_in_a_terminal_shows_the_dashboard_then_the_diagnosis(tmp_path):
    if not shutil.which("tmux"):
        pytest.fail("tmux is needed (make setup installs it)")
    session = f"acceptrace-demo-{tmp_path.name[-8:]}"
    report = tmp_path / "demo.json"
    with ScratchNamespace() as ns:
        cmd = " ".join(["ip", "netns", "exec", ns, *ACCEPTRACE, "demo", "--duration", "8",
                        "--json", str(report)])
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
        subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "110", "-y", "45",
                        cmd + "; echo DEMO-EXITED $?; sleep 60"], check=True)

        def screen(history: bool = False) -> str:
            return subprocess.run(["tmux", "capture-pane", "-p", "-t", session,
                                   *(["-S", "-"] if history else [])],
                                  capture_output=True, text=True).stdout
        try:
            # the live dashboard, not lines: the flow, its rates, the queue gauges
            assert wait_until(lambda: "conn/s" in screen(), timeout=90), screen()
            live = screen()
            assert "accept queue" in live and "listen overflows" in live
            assert wait_until(lambda: "DEMO-EXITED" in screen(), timeout=90), screen(True)
            text = screen(True)
        finally:
            subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    assert "DEMO-EXITED 0" in text, text
    text = text[:text.index("DEMO-EXITED")]
    # after the dashboard: what the clients saw, the summary, and the diagnosis last
    assert text.index("load generator:") < text.index("stages") < text.rindex("diagnosis")
    words = last_words(text)
    assert "accept queue overflowed" in words[1], words
    notes_once(text)
    assert json.loads(Path(report).read_text())["drops"]["listen_overflow"] is not None
