"""Which processes serve a port, which server they are, and where to hook ASGI dispatch.

Processes: the port's listening sockets' inodes (/proc/net/tcp{,6}), found
among /proc/PID/fd links ``socket:[INODE]`` -- every uvicorn worker shares
the parent's socket, gunicorn --reuse-port workers have one each.

Which server a process is (nginx, gunicorn and its worker class, uvicorn,
hypercorn, granian, node, a Python socketserver, or unknown): ``recognise``,
a pure function of what /proc says of it and of its parents (``ProcText``:
comm, command line, executable, loaded files), read by ``read_proc``;
``SERVER_FACTS`` holds each server's listen-backlog and worker options and
their defaults (docs/servers.md cites the source of each).

Dispatch hook: uvicorn's httptools parser (a Cython extension) calls
``cb_on_headers_complete`` when a request's headers are parsed; uvicorn then
builds the ASGI scope and schedules the app. The symbol is in the module's
``.symtab`` (the wheels keep it); it is resolved with pyelftools. A stripped
module leaves only ``llhttp_execute`` in ``.dynsym``, called for every chunk
the parser is fed -- at the first bytes of a request, so it measures the
parse start (see docs/dispatch.md).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import procnet

HEADERS_COMPLETE_RE = re.compile(r"^__pyx_f_\w*httptools\w*parser\w*cb_on_headers_complete$")
FALLBACK_SYMBOL = "llhttp_execute"
HTTPTOOLS_SO_RE = re.compile(r"/httptools/parser/parser[^/]*\.so$")
UVLOOP_SO_RE = re.compile(r"/uvloop/loop[^/]*\.so$")
H11_CMDLINE_RE = re.compile(r"--http[= ]h11\b|UvicornH11Worker")


@dataclass(frozen=True)
class DispatchTarget:
    path: str           # the shared object, as mapped
    symbol: str
    vaddr: int          # st_value
    file_offset: int    # where the uprobe goes: vaddr mapped through PT_LOAD
    exact: bool         # False: the llhttp_execute fallback (parse start, not dispatch)


@dataclass
class ServerInfo:
    pid: int
    comm: str
    cmdline: str
    loop: str | None = None      # "uvloop" | "asyncio" | None (not Python/unknown)
    parser: str | None = None    # "httptools" | "h11" | None
    parser_path: str | None = None
    mapped: list[str] = field(default_factory=list)


def socket_inodes(port: int) -> set[int]:
    return {s.inode for s in procnet.listening_sockets(port)}


def pids_with_sockets(inodes: set[int], proc: Path = Path("/proc")) -> list[int]:
    """Processes holding any of these socket inodes open."""
    return pids_holding({f"socket:[{i}]" for i in inodes}, proc)


def pids_holding(want: set[str], proc: Path = Path("/proc")) -> list[int]:
    """Processes with a file descriptor whose /proc/PID/fd link is one of ``want``
    (``socket:[INODE]``, ``anon_inode:bpf-stats``, ...)."""
    if not want:
        return []
    pids = []
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            for fd in (d / "fd").iterdir():
                try:
                    if os.readlink(fd) in want:
                        pids.append(int(d.name))
                        break
                except OSError:
                    continue
        except OSError:
            continue
    return sorted(pids)


def alive(pid: int, proc: Path = Path("/proc")) -> bool:
    return (proc / str(pid)).exists()


def server_pids(port: int) -> list[int]:
    return pids_with_sockets(socket_inodes(port))


def mapped_files(pid: int, proc: Path = Path("/proc")) -> list[str]:
    try:
        text = (proc / str(pid) / "maps").read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5].startswith("/"):
            path = parts[5].removesuffix(" (deleted)")
            if path not in out:
                out.append(path)
    return out


def seen_from_here(pid: int, path: str, proc: Path = Path("/proc")) -> str:
    """A file ``pid`` maps, as a path acceptrace can open: through /proc/PID/root when
    the process has its own mount namespace (a container's files are not ours)."""
    try:
        theirs = (proc / str(pid) / "ns" / "mnt").stat().st_ino
        ours = (proc / "self" / "ns" / "mnt").stat().st_ino
    except OSError:
        return path
    return path if theirs == ours else f"{proc}/{pid}/root{path}"


def inspect(pid: int, proc: Path = Path("/proc")) -> ServerInfo:
    def read(name: str) -> str:
        try:
            return (proc / str(pid) / name).read_bytes().decode(errors="replace")
        except OSError:
            return ""

    info = ServerInfo(pid=pid, comm=read("comm").strip(),
                      cmdline=read("cmdline").replace("\0", " ").strip())
    info.mapped = mapped_files(pid, proc)
    is_python = any(re.search(r"/libpython3|/python3(\.\d+)?$", p) for p in info.mapped)
    is_python = is_python or "python" in info.comm or "uvicorn" in info.cmdline
    for path in info.mapped:
        if HTTPTOOLS_SO_RE.search(path):
            info.parser, info.parser_path = "httptools", path
        if UVLOOP_SO_RE.search(path):
            info.loop = "uvloop"
    if info.parser_path:
        info.parser_path = seen_from_here(pid, info.parser_path, proc)
    if is_python and info.loop is None:
        info.loop = "asyncio"
    # uvicorn maps httptools whenever it is installed; the command line says which
    # parser runs (and a server without it falls back to h11).
    if H11_CMDLINE_RE.search(info.cmdline) or (info.parser is None and "uvicorn" in info.cmdline):
        info.parser, info.parser_path = "h11", None
    return info


def find_dispatch_symbol(path: str) -> DispatchTarget | None:
    """cb_on_headers_complete from .symtab, else llhttp_execute from .dynsym."""
    from elftools.elf.elffile import ELFFile  # noqa: PLC0415
    from elftools.elf.sections import SymbolTableSection  # noqa: PLC0415

    try:
        with open(path, "rb") as fh:
            elf = ELFFile(fh)
            loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]

            def target(sym: object, exact: bool) -> DispatchTarget | None:
                vaddr = int(sym["st_value"])  # type: ignore[index]
                for seg in loads:
                    if seg["p_vaddr"] <= vaddr < seg["p_vaddr"] + seg["p_filesz"]:
                        off = vaddr - seg["p_vaddr"] + seg["p_offset"]
                        return DispatchTarget(path, sym.name, vaddr, off, exact)  # type: ignore[attr-defined]
                return None

            symtab = elf.get_section_by_name(".symtab")
            if isinstance(symtab, SymbolTableSection):
                for sym in symtab.iter_symbols():
                    if sym["st_info"]["type"] == "STT_FUNC" and sym["st_value"] and \
                            HEADERS_COMPLETE_RE.match(sym.name):
                        found = target(sym, True)
                        if found:
                            return found
            dynsym = elf.get_section_by_name(".dynsym")
            if isinstance(dynsym, SymbolTableSection):
                for sym in dynsym.iter_symbols():
                    if sym.name == FALLBACK_SYMBOL and sym["st_value"]:
                        return target(sym, False)
    except (OSError, ValueError, KeyError):
        return None
    except Exception:  # noqa: BLE001 - pyelftools raises its own ELFError on junk
        return None
    return None


# -- which server a process is ----------------------------------------------------------

# Every value of processes[].server (docs/schema.md).
SERVER_NAMES = ("nginx", "gunicorn", "uvicorn", "hypercorn", "granian", "node",
                "socketserver", "unknown")
# Python servers named by their console script, `python -m NAME`, or comm.
PYTHON_SERVERS = ("gunicorn", "uvicorn", "hypercorn", "granian")
# `python -m MODULE` of the standard library's servers built on socketserver.
SOCKETSERVER_MODULES = ("http.server", "socketserver", "xmlrpc.server")
GRANIAN_SO_RE = re.compile(r"/granian/_granian[^/]*\.so$")
# A child started by multiprocessing's spawn (uvicorn --workers, hypercorn): its
# command line says nothing of the server; its parent does.
SPAWN_MARKERS = ("--multiprocessing-fork", "from multiprocessing.spawn import spawn_main")
PARENT_DEPTH = 4


@dataclass(frozen=True)
class ProcText:
    """What /proc says of one process: the input of ``recognise``."""

    pid: int
    comm: str                      # /proc/PID/comm: the main thread's name
    argv: tuple[str, ...]          # /proc/PID/cmdline split at NUL (a title written over
    #                                it by nginx or setproctitle: one string)
    exe: str = ""                  # readlink /proc/PID/exe ("" when unreadable)
    ppid: int = 0
    maps: tuple[str, ...] = ()     # the files it maps (/proc/PID/maps)
    gunicorn_conf: bool = False    # its working directory holds gunicorn.conf.py


@dataclass(frozen=True)
class Server:
    """A recognised server: one of SERVER_NAMES, and gunicorn's worker class when known."""

    name: str
    worker_class: str | None = None


UNKNOWN = Server("unknown")


def _module_or_script(argv: Sequence[str]) -> str | None:
    """What a Python command line runs: the module of ``-m MODULE``, else the basename of
    the script (argv[0] itself when a console script is exec'd through its #! line)."""
    if not argv:
        return None
    first = os.path.basename(argv[0])
    if not re.match(r"python[\d.]*$", first):
        return first
    i = 1
    while i < len(argv):
        a = argv[i]
        if a == "-m" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("-m") and len(a) > 2:
            return a[2:]
        if a in ("-c",):
            return None
        if a in ("-W", "-X", "-Q"):
            i += 2
            continue
        if a.startswith("-"):
            i += 1
            continue
        return os.path.basename(a)
    return None


def gunicorn_worker_class(argv: Sequence[str], conf_file: bool = False) -> str | None:
    """The worker class from gunicorn's command line (``-k``/``--worker-class``); its
    default ``sync`` when neither the command line nor a config file (``-c``, or
    gunicorn.conf.py in the working directory) may set it; None: not known."""
    config = conf_file
    for i, a in enumerate(argv):
        if a in ("-k", "--worker-class") and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--worker-class="):
            return a.split("=", 1)[1]
        if a.startswith("-k") and len(a) > 2 and not a.startswith("--"):
            return a[2:]
        if a in ("-c", "--config") or a.startswith("--config="):
            config = True
    return None if config else "sync"


def _by_itself(p: ProcText) -> Server | None:
    """The server this process is from its own text; None: it does not say."""
    exe = os.path.basename(p.exe.removesuffix(" (deleted)"))
    title = " ".join(p.argv)   # a title written over argv (nginx, setproctitle) is one string
    if exe == "nginx" or p.comm == "nginx" or title.startswith("nginx: "):
        return Server("nginx")
    if exe in ("node", "nodejs") or p.comm in ("node", "nodejs"):
        return Server("node")
    # setproctitle titles (gunicorn, granian) replace the command line and the comm
    if title.startswith("gunicorn: ") or p.comm.startswith("gunicorn"):
        if title.startswith("gunicorn: "):
            return Server("gunicorn")  # the worker class is no longer visible
        return Server("gunicorn", gunicorn_worker_class(p.argv, p.gunicorn_conf))
    if title.startswith("granian ") or p.comm.startswith("granian") or \
            any(GRANIAN_SO_RE.search(m) for m in p.maps):
        return Server("granian")
    what = _module_or_script(p.argv)
    top = (what or "").split(".")[0].removesuffix(".py")
    if top == "gunicorn" or (what or "").removesuffix(".py") == "gunicorn":
        return Server("gunicorn", gunicorn_worker_class(p.argv, p.gunicorn_conf))
    for name in PYTHON_SERVERS:
        if (what or "").removesuffix(".py") == name or top == name or p.comm == name:
            return Server(name)
    if what in SOCKETSERVER_MODULES:
        return Server("socketserver")
    return None


def recognise(p: ProcText, parents: Sequence[ProcText] = ()) -> Server:
    """Which server process ``p`` is; ``parents``: its ancestors, nearest first (a
    multiprocessing child -- uvicorn --workers, hypercorn -- is its parent's)."""
    found = _by_itself(p)
    if found is not None:
        return found
    if any(m in a for a in p.argv for m in SPAWN_MARKERS):
        for parent in parents:
            found = _by_itself(parent)
            if found is not None:
                return found
            if not any(m in a for a in parent.argv for m in SPAWN_MARKERS):
                break
    return UNKNOWN


def read_proc(pid: int, proc: Path = Path("/proc")) -> ProcText | None:
    """What /proc says of ``pid`` (None: it is gone)."""
    base = proc / str(pid)
    try:
        comm = (base / "comm").read_text().strip()
        raw = (base / "cmdline").read_bytes()
        status = (base / "status").read_text()
    except OSError:
        return None
    argv = tuple(a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0")) \
        if raw else ()
    m = re.search(r"^PPid:\s*(\d+)", status, re.M)
    try:
        exe = os.readlink(base / "exe")
    except OSError:
        exe = ""
    conf = False
    if "gunicorn" in comm or any("gunicorn" in a for a in argv[:3]):
        conf = (base / "cwd" / "gunicorn.conf.py").exists()
    return ProcText(pid=pid, comm=comm, argv=argv, exe=exe, ppid=int(m.group(1)) if m else 0,
                    maps=tuple(mapped_files(pid, proc)), gunicorn_conf=conf)


def identify(pid: int, proc: Path = Path("/proc")) -> tuple[str | None, Server]:
    """The program (comm of the main thread; None if gone) and the server of ``pid``."""
    me = read_proc(pid, proc)
    if me is None:
        return None, UNKNOWN
    parents: list[ProcText] = []
    if any(m in a for a in me.argv for m in SPAWN_MARKERS):
        ppid = me.ppid
        while ppid > 1 and len(parents) < PARENT_DEPTH:
            parent = read_proc(ppid, proc)
            if parent is None:
                break
            parents.append(parent)
            ppid = parent.ppid
    return me.comm or None, recognise(me, parents)


# -- each server's own terms (docs/servers.md cites where each default comes from) -----

@dataclass(frozen=True)
class ServerFacts:
    """How a server sets its listen backlog and its workers, with their defaults."""

    backlog_option: str
    backlog_default: int
    workers_option: str
    workers_default: str
    backlog_note: str = ""


SERVER_FACTS: dict[str, ServerFacts] = {
    "nginx": ServerFacts("listen ... backlog=N", 511, "worker_processes",
                         "1; auto: one per CPU, as Debian's nginx.conf sets"),
    "gunicorn": ServerFacts("--backlog", 2048, "-w/--workers", "1, or $WEB_CONCURRENCY"),
    "uvicorn": ServerFacts("--backlog", 2048, "--workers", "1, or $WEB_CONCURRENCY"),
    "hypercorn": ServerFacts("--backlog", 100, "-w/--workers", "1"),
    "granian": ServerFacts("--backlog", 1024, "--workers", "1",
                           backlog_note="on each worker's own SO_REUSEPORT socket"),
    "node": ServerFacts("server.listen(port, host, backlog)", 511,
                        "the cluster module (one cluster.fork() per worker)", "none: one process"),
    "socketserver": ServerFacts("request_queue_size (a class attribute)", 5,
                                "ThreadingMixIn / ForkingMixIn (a thread or process per "
                                "connection)", "one process, one connection at a time"),
}
