"""Which server a process is, from what /proc says of it: pure, from fixture strings.

The strings are what /proc showed of real servers (nginx 1.22, gunicorn 27,
uvicorn 0.55, hypercorn 0.18, granian 2.8, node 20, CPython 3.11), with and
without setproctitle; tests/test_servers.py recognises the same servers
running.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from acceptrace.servers import (
    SERVER_FACTS,
    SERVER_NAMES,
    ProcText,
    Server,
    gunicorn_worker_class,
    identify,
    read_proc,
    recognise,
)

PY = "/root/.pyenv/versions/3.11.7/bin/python3.11"
VENV = "/srv/venv/bin"
SPAWN = (f"{VENV}/python3", "-B", "-c",
         "from multiprocessing.spawn import spawn_main; spawn_main(tracker_fd=5, pipe_handle=7)",
         "--multiprocessing-fork")
GRANIAN_SO = ("/srv/venv/lib/python3.11/site-packages/granian/"
              "_granian.cpython-311-x86_64-linux-gnu.so")


def proc(comm: str, *argv: str, exe: str = PY, maps: tuple[str, ...] = (), ppid: int = 1,
         pid: int = 100) -> ProcText:
    return ProcText(pid=pid, comm=comm, argv=argv, exe=exe, ppid=ppid, maps=maps)


@pytest.mark.parametrize("p, want", [
    # nginx writes its title over argv; comm stays "nginx"
    (proc("nginx", "nginx: master process /usr/sbin/nginx -c /tmp/n.conf", exe="/usr/sbin/nginx"),
     Server("nginx")),
    (proc("nginx", "nginx: worker process", exe="/usr/sbin/nginx"), Server("nginx")),
    # gunicorn's console script: comm is the script's name, argv the original one
    (proc("gunicorn", f"{VENV}/python3", f"{VENV}/gunicorn", "-w", "2", "-k",
          "uvicorn.workers.UvicornWorker", "-b", "127.0.0.1:8000", "app:app"),
     Server("gunicorn", "uvicorn.workers.UvicornWorker")),
    (proc("gunicorn", f"{VENV}/python3", f"{VENV}/gunicorn", "--worker-class=gthread", "app:app"),
     Server("gunicorn", "gthread")),
    (proc("python3", "python3", "-m", "gunicorn", "-b", "127.0.0.1:8000", "app:app"),
     Server("gunicorn", "sync")),            # gunicorn's default worker class
    (proc("python3", "python3", "-m", "gunicorn", "-c", "conf.py", "app:app"),
     Server("gunicorn", None)),              # a config file may set it: not known
    # with setproctitle the title replaces argv and comm: the worker class is gone
    (proc("gunicorn: worke", "gunicorn: worker [app:app]                       "),
     Server("gunicorn", None)),
    (proc("uvicorn", f"{VENV}/python3", f"{VENV}/uvicorn", "--host", "127.0.0.1", "app:app"),
     Server("uvicorn")),
    (proc("python", "/usr/bin/python3", "-m", "uvicorn", "app:app", "--port", "8000"),
     Server("uvicorn")),
    (proc("hypercorn", f"{VENV}/python3", f"{VENV}/hypercorn", "-w", "2", "-b", "127.0.0.1:8003",
          "app:app"), Server("hypercorn")),
    (proc("python3", "python3", "-m", "hypercorn", "app:app"), Server("hypercorn")),
    # granian: its extension module is the marker, whatever the title says
    (proc("granian", f"{VENV}/python3", f"{VENV}/granian", "--interface", "asgi", "app:app",
          maps=(GRANIAN_SO,)), Server("granian")),
    (proc("granian asgi 12", "granian asgi 127.0.0.1:18004 app:app worker-1       ",
          maps=(GRANIAN_SO,)), Server("granian")),
    (proc("myapp", "myapp", maps=(GRANIAN_SO,)), Server("granian")),
    (proc("node", "node", "server.js", exe="/usr/bin/node"), Server("node")),
    (proc("node", "/usr/bin/node", "/srv/app/server.js", exe="/usr/bin/node"), Server("node")),
    (proc("python3", "python3", "-m", "http.server", "8000"), Server("socketserver")),
    (proc("python3", "python3", "-u", "-m", "http.server", "--bind", "127.0.0.1"),
     Server("socketserver")),
    (proc("python3", "python3", "server.py"), Server("unknown")),
    (proc("java", "java", "-jar", "app.jar", exe="/usr/lib/jvm/bin/java"), Server("unknown")),
    (proc("", ), Server("unknown")),
])
def test_recognise(p, want):
    assert recognise(p) == want
    assert want.name in SERVER_NAMES


def test_multiprocessing_children_are_their_parents():
    """uvicorn --workers and hypercorn spawn their workers: the child's command line is
    multiprocessing's; the parent's names the server."""
    child = proc("python3", *SPAWN, pid=11, ppid=10)
    for parent, want in (
        (proc("uvicorn", f"{VENV}/python3", f"{VENV}/uvicorn", "--workers", "2", "app:app",
              pid=10), "uvicorn"),
        (proc("hypercorn", f"{VENV}/python3", f"{VENV}/hypercorn", "-w", "2", "app:app",
              pid=10), "hypercorn"),
    ):
        assert recognise(child, [parent]).name == want
    assert recognise(child).name == "unknown"     # parent gone
    # a spawned child of an unrecognised program stays unknown; the walk stops there
    shell = proc("python3", "python3", "job.py", pid=10)
    uv = proc("uvicorn", f"{VENV}/python3", f"{VENV}/uvicorn", "app:app", pid=9)
    assert recognise(child, [shell, uv]).name == "unknown"


@pytest.mark.parametrize("argv, conf, want", [
    (("gunicorn", "-k", "gevent", "app:app"), False, "gevent"),
    (("gunicorn", "-kgevent", "app:app"), False, "gevent"),
    (("gunicorn", "--worker-class", "eventlet", "app:app"), False, "eventlet"),
    (("gunicorn", "app:app"), False, "sync"),
    (("gunicorn", "app:app"), True, None),          # gunicorn.conf.py in its directory
    (("gunicorn", "--config=g.py", "app:app"), False, None),
    (("gunicorn", "-c", "g.py", "-k", "gthread", "app:app"), False, "gthread"),
])
def test_gunicorn_worker_class(argv, conf, want):
    assert gunicorn_worker_class(argv, conf) == want


def test_every_recognised_server_has_its_facts():
    assert set(SERVER_FACTS) == set(SERVER_NAMES) - {"unknown"}
    assert SERVER_FACTS["nginx"].backlog_default == 511
    assert SERVER_FACTS["gunicorn"].backlog_default == 2048
    assert SERVER_FACTS["uvicorn"].backlog_default == 2048
    assert SERVER_FACTS["hypercorn"].backlog_default == 100
    assert SERVER_FACTS["granian"].backlog_default == 1024
    assert SERVER_FACTS["node"].backlog_default == 511
    assert SERVER_FACTS["socketserver"].backlog_default == 5


def fake_proc(root: Path, pid: int, comm: str, argv: list[str], ppid: int,
              maps: list[str] = ()) -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    (d / "comm").write_text(comm + "\n")
    (d / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in argv))
    (d / "status").write_text(f"Name:\t{comm}\nUmask:\t0022\nState:\tS\nPPid:\t{ppid}\n")
    (d / "maps").write_text("".join(
        f"7f00{i:04x}000-7f00{i:04x}fff r-xp 00000000 08:01 {i} {m}\n" for i, m in enumerate(maps)))


def test_read_proc_and_identify_walk_up_to_the_parent(tmp_path):
    fake_proc(tmp_path, 10, "hypercorn", [f"{VENV}/python3", f"{VENV}/hypercorn", "app:app"], 1)
    fake_proc(tmp_path, 11, "python3", list(SPAWN), 10,
              maps=[PY, "/usr/lib/x86_64-linux-gnu/libc.so.6"])
    p = read_proc(11, tmp_path)
    assert p is not None and p.ppid == 10 and p.argv == SPAWN and p.comm == "python3"
    assert p.maps == (PY, "/usr/lib/x86_64-linux-gnu/libc.so.6")
    assert p.exe == ""                       # no exe link in the fake tree
    assert identify(11, tmp_path) == ("python3", Server("hypercorn"))
    assert identify(12, tmp_path) == (None, Server("unknown"))   # gone
    # a title written over argv (nginx pads it with NULs) is one string
    fake_proc(tmp_path, 20, "nginx", ["nginx: worker process", "", ""], 1)
    assert read_proc(20, tmp_path).argv[0] == "nginx: worker process"
    assert identify(20, tmp_path)[1] == Server("nginx")
