"""Which processes serve a port, what they run, and where to hook ASGI dispatch.

Processes: the port's listening sockets' inodes (/proc/net/tcp{,6}), found
among /proc/PID/fd links ``socket:[INODE]`` -- every uvicorn worker shares
the parent's socket, gunicorn --reuse-port workers have one each.

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
    if not inodes:
        return []
    want = {f"socket:[{i}]" for i in inodes}
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
