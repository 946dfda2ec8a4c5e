"""bpf/acceptrace.h and tracer/layout.py agree: sizes, offsets and ids."""

from __future__ import annotations

import ctypes as ct
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from acceptrace import layout as L

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
STRUCTS = {
    "at_conn": L.AtConn,
    "at_sample": L.AtSample,
}


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory) -> dict[str, int]:
    if not shutil.which("gcc"):
        pytest.fail("gcc is needed to check the shared header (make setup installs it)")
    tmp = tmp_path_factory.mktemp("layout")
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include "acceptrace.h"',
             "int main(void) {"]
    for name, cls in STRUCTS.items():
        lines.append(f'printf("{name} %zu\\n", sizeof(struct {name}));')
        for fname, *_ in cls._fields_:
            lines.append(f'printf("{name}.{fname} %zu\\n", offsetof(struct {name}, {fname}));')
    lines.append("return 0; }")
    src = tmp / "layout.c"
    src.write_text("\n".join(lines))
    exe = tmp / "layout"
    subprocess.run(["gcc", "-DAT_USERSPACE", f"-I{BPF_DIR}", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in (ln.split() for ln in out.splitlines())}


@pytest.mark.parametrize("name", list(STRUCTS))
def test_struct_layout_matches_header(c_layout, name):
    cls = STRUCTS[name]
    assert ct.sizeof(cls) == c_layout[name]
    for fname, *_ in cls._fields_:
        assert getattr(cls, fname).offset == c_layout[f"{name}.{fname}"], fname


def enum_values(enum_name: str) -> dict[str, int]:
    text = (BPF_DIR / "acceptrace.h").read_text()
    body = re.search(r"enum " + enum_name + r" \{(.*?)\};", text, re.S)
    assert body, enum_name
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"(AT_\w+) = (\d+)", body.group(1))}


def test_hist_ids_match_header():
    for cname, value in enum_values("at_hist_id").items():
        assert getattr(L, cname[3:]) == value, cname


def test_counter_ids_match_header():
    for cname, value in enum_values("at_counter_id").items():
        assert getattr(L, cname[3:]) == value, cname


def test_sample_reasons_match_header():
    text = (BPF_DIR / "acceptrace.h").read_text()
    assert f"#define AT_SAMPLE_READ {L.SAMPLE_READ}" in text
    assert f"#define AT_SAMPLE_CLOSE {L.SAMPLE_CLOSE}" in text
    assert f"#define AT_CONN_SYN_SEEN {L.CONN_SYN_SEEN}" in text


def test_bpf_sources_ship_in_package():
    import importlib.resources

    names = {p.name for p in importlib.resources.files("acceptrace.bpf").iterdir()}
    from acceptrace import hooks

    assert {"acceptrace.h", *hooks.SOURCES.values()} <= names
    bpf = Path(importlib.resources.files("acceptrace.bpf"))  # type: ignore[arg-type]
    for src in hooks.SOURCES.values():
        # every header the source includes ships beside it (bpfloader.translation_unit)
        for inc in re.findall(r'#include "([\w.-]+)"', (bpf / src).read_text()):
            assert inc in names, (src, inc)


def test_attach_types_match_header():
    from acceptrace import hooks

    text = (BPF_DIR / "acceptrace.h").read_text()
    for name in ("OFF", "FENTRY", "KPROBE", "TRACEPOINT", "RAW_TRACEPOINT"):
        assert re.search(rf"#define AT_ATTACH_{name} {getattr(hooks, 'ATTACH_' + name)}\b", text)


def test_translation_unit_inlines_our_headers_once_each_with_line_markers():
    from acceptrace.bpfloader import translation_unit

    for src in ("fentry.bpf.c", "kprobe.bpf.c", "tracepoint.bpf.c"):
        text = translation_unit(BPF_DIR, src)
        assert '#include "' not in text.replace('#include "acceptrace.h"', "")
        assert f'#line 1 "{src}"' in text and '#line 1 "common.bpf.h"' in text
