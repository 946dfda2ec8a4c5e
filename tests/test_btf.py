"""The BTF reader, checked against bpftool (an independent implementation) on
the running kernel and on Debian bookworm's 6.1 kernel, and on small blobs."""

from __future__ import annotations

import json
import lzma
import shutil
import struct
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest
from acceptrace import kernel
from acceptrace.btf import BTF, BTFError

VMLINUX = Path("/sys/kernel/btf/vmlinux")
FIXTURE_61 = Path(__file__).parent / "fixtures" / "btf-debian-6.1-amd64.xz"
ALL_OFFSETS = {**kernel.OFFSETS, **kernel.OPTIONAL_OFFSETS}


@lru_cache(maxsize=4)
def bpftool_types(path: str) -> dict:
    if not shutil.which("bpftool"):
        pytest.fail("bpftool is needed as the oracle (make setup installs it)")
    out = subprocess.run(["bpftool", "-j", "btf", "dump", "file", path],
                         capture_output=True, text=True, check=True).stdout
    types = json.loads(out)["types"]
    by_id = {t["id"]: t for t in types}
    structs: dict[str, dict] = {}
    for t in types:
        if t["kind"] in ("STRUCT", "UNION") and t.get("name") not in (None, "(anon)"):
            prev = structs.get(t["name"])
            if prev is None or t.get("vlen", 0) > prev.get("vlen", 0):
                structs[t["name"]] = t
    enums = {}
    for t in types:
        if t["kind"] in ("ENUM", "ENUM64"):
            for v in t.get("values", []):
                enums.setdefault(v["name"], v["val"])
    funcs = {t["name"]: t for t in types if t["kind"] == "FUNC"}
    return {"by_id": by_id, "structs": structs, "enums": enums, "funcs": funcs}


def oracle_offset(db: dict, struct_name: str, path: str) -> int:
    def strip(tid: int) -> dict:
        t = db["by_id"][tid]
        while t["kind"] in ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"):
            t = db["by_id"][t["type_id"]]
        return t

    def find(t: dict, name: str) -> tuple[int, dict] | None:
        for m in t["members"]:
            if m["name"] == name:
                return m["bits_offset"], strip(m["type_id"])
        for m in t["members"]:
            if m["name"] == "(anon)":
                sub = strip(m["type_id"])
                if sub["kind"] in ("STRUCT", "UNION"):
                    r = find(sub, name)
                    if r:
                        return m["bits_offset"] + r[0], r[1]
        return None

    t, bits = db["structs"][struct_name], 0
    for step in path.split("."):
        found = find(t, step)
        assert found, f"bpftool: {struct_name}.{path}"
        bits += found[0]
        t = found[1]
    assert bits % 8 == 0
    return bits // 8


def oracle_arg_count(db: dict, func: str) -> int:
    proto = db["by_id"][db["funcs"][func]["type_id"]]
    return len(proto["params"])


@pytest.fixture(scope="module")
def btf_here() -> BTF:
    if not VMLINUX.exists():
        pytest.skip("this kernel has no BTF")
    return BTF.load(VMLINUX)


@pytest.fixture(scope="module")
def raw_61(tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("btf61") / "btf-6.1.raw"
    raw.write_bytes(lzma.decompress(FIXTURE_61.read_bytes()))
    return raw


@pytest.fixture(scope="module")
def btf_61(raw_61) -> BTF:
    return BTF.load(FIXTURE_61)


@pytest.mark.parametrize("define", sorted(ALL_OFFSETS))
def test_offsets_match_bpftool_running_kernel(btf_here, define):
    struct_name, path = ALL_OFFSETS[define]
    assert btf_here.member_offset(struct_name, path) == oracle_offset(
        bpftool_types(str(VMLINUX)), struct_name, path)


@pytest.mark.parametrize("define", sorted(ALL_OFFSETS))
def test_offsets_match_bpftool_debian_61(btf_61, raw_61, define):
    struct_name, path = ALL_OFFSETS[define]
    assert btf_61.member_offset(struct_name, path) == oracle_offset(
        bpftool_types(str(raw_61)), struct_name, path)


def test_enums_and_functions_running_kernel(btf_here):
    db = bpftool_types(str(VMLINUX))
    for name in ("TCP_LISTEN", "TCP_ESTABLISHED", "TCP_SYN_RECV", "TCP_CLOSE",
                 "SKB_DROP_REASON_TCP_LISTEN_OVERFLOW"):
        assert btf_here.enum_value(name) == db["enums"][name], name
    for func in ("tcp_conn_request", "inet_csk_accept", "tcp_v4_syn_recv_sock"):
        assert btf_here.func_arg_count(func) == oracle_arg_count(db, func), func
    assert btf_here.enum_value("TCP_LISTEN") == 10


def test_debian_61_known_answers(btf_61, raw_61):
    # Linux 6.1: the old inet_csk_accept signature, no TCP_LISTEN_OVERFLOW reason.
    proto = btf_61.func_proto("inet_csk_accept")
    assert [a for a, _ in proto.args] == ["sk", "flags", "err", "kern"]
    assert proto.ret == "struct sock *"
    assert btf_61.func_arg_count("tcp_conn_request") == 4
    # 6.1.192 carries the stable backport that added a 7th argument (opt_child_init):
    # arg counts drift within one "version", so they are read from BTF.
    assert btf_61.func_arg_count("tcp_v4_syn_recv_sock") == 7
    assert not btf_61.has_enum_value("SKB_DROP_REASON_TCP_LISTEN_OVERFLOW")
    assert btf_61.has_enum_value("SKB_DROP_REASON_NOT_SPECIFIED")
    assert btf_61.enum_value("TCP_LISTEN") == 10
    # Verified with bpftool on the fixture (6.1.192, amd64):
    assert btf_61.member_offset("sock", "__sk_common.skc_num") == 14
    assert btf_61.member_offset("sock", "__sk_common.skc_daddr") == 0
    assert btf_61.member_size("request_sock", "num_retrans") == 1
    assert btf_61.member_size("tcp_request_sock", "snt_synack") == 8
    db = bpftool_types(str(raw_61))
    assert btf_61.func_arg_count("inet_csk_accept") == oracle_arg_count(db, "inet_csk_accept")


def test_resolve_offsets_on_both_kernels(btf_here, btf_61):
    here, _ = kernel.resolve_offsets(btf_here)
    old, notes = kernel.resolve_offsets(btf_61)
    assert set(kernel.OFFSETS) <= set(here) and set(kernel.OFFSETS) <= set(old)
    assert "AT_DROP_REASON_LISTEN_OVERFLOW" in here
    assert "AT_DROP_REASON_LISTEN_OVERFLOW" not in old
    assert any("SKB_DROP_REASON_TCP_LISTEN_OVERFLOW" in n for n in notes)
    # The layouts really differ between the two kernels: that is why offsets
    # come from BTF and never from the (6.1) headers BCC compiles against.
    assert any(here[k] != old[k] for k in kernel.OFFSETS)


def test_load_is_fast_enough(btf_here):
    import time

    t0 = time.perf_counter()
    b = BTF.load(VMLINUX)
    b.member_offset("inet_connection_sock", "icsk_accept_queue.rskq_accept_tail")
    b.enum_value("TCP_LISTEN")
    assert time.perf_counter() - t0 < 5  # generous: a CI machine may be slow


# ---- hand-built blobs ---------------------------------------------------------------


class Blob:
    """A minimal BTF writer for tests."""

    def __init__(self, endian: str = "<") -> None:
        self.e = endian
        self.strings = b"\0"
        self.types = b""
        self.n = 0

    def s(self, name: str) -> int:
        if not name:
            return 0
        off = len(self.strings)
        self.strings += name.encode() + b"\0"
        return off

    def add(self, name: str, kind: int, vlen: int, size_or_type: int, extra: bytes = b"",
            kflag: bool = False) -> int:
        info = (kind << 24) | vlen | (1 << 31 if kflag else 0)
        self.types += struct.pack(self.e + "3I", self.s(name), info, size_or_type) + extra
        self.n += 1
        return self.n

    def int_(self, name: str, size: int) -> int:
        return self.add(name, 1, 0, size, struct.pack(self.e + "I", size * 8))

    def struct_(self, name: str, size: int, members: list[tuple[str, int, int, int]],
                union: bool = False) -> int:
        kflag = any(bf for *_x, bf in members)
        extra = b"".join(
            struct.pack(self.e + "3I", self.s(n), t, (bf << 24 | bits) if kflag else bits)
            for n, t, bits, bf in members)
        return self.add(name, 5 if union else 4, len(members), size, extra, kflag)

    def bytes(self) -> bytes:
        hdr = struct.pack(self.e + "HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(self.types),
                          len(self.types), len(self.strings))
        return hdr + self.types + self.strings


def build_sample(endian: str = "<") -> bytes:
    b = Blob(endian)
    u32 = b.int_("unsigned int", 4)                              # 1
    u16 = b.int_("unsigned short", 2)                            # 2
    td = b.add("__u16", 8, 0, u16)                               # 3 typedef
    cst = b.add("", 10, 0, td)                                   # 4 const __u16
    inner = b.struct_("", 4, [("lo", cst, 0, 0), ("hi", u16, 16, 0)])         # 5 anon
    un = b.struct_("", 4, [("both", u32, 0, 0), ("", inner, 0, 0)], union=True)  # 6 anon union
    b.struct_("outer", 12, [("a", u32, 0, 0), ("", un, 32, 0), ("flags", u32, 64, 3)])  # 7
    b.add("big", 19, 2, 8, struct.pack(endian + "3I", b.s("BIG_ONE"), 1, 0)
          + struct.pack(endian + "3I", b.s("BIG_HUGE"), 0, 1))  # 8 enum64
    b.add("small", 6, 1, 4, struct.pack(endian + "Ii", b.s("SMALL_NEG"), -3), kflag=True)  # 9
    return b.bytes()


@pytest.mark.parametrize("endian", ["<", ">"])
def test_blob_anonymous_members_typedefs_enums(endian):
    btf = BTF.from_bytes(build_sample(endian))
    assert btf.member_offset("outer", "a") == 0
    assert btf.member_offset("outer", "both") == 4      # through the anonymous union
    assert btf.member_offset("outer", "lo") == 4        # union -> anonymous struct
    assert btf.member_offset("outer", "hi") == 6
    assert btf.member_size("outer", "lo") == 2          # const typedef -> u16
    assert btf.struct_size("outer") == 12
    assert btf.enum_value("BIG_ONE") == 1
    assert btf.enum_value("BIG_HUGE") == 1 << 32        # ENUM64 high word
    assert btf.enum_value("SMALL_NEG") == -3            # signed enum (kind_flag)


def test_blob_errors():
    btf = BTF.from_bytes(build_sample())
    with pytest.raises(BTFError, match="bitfield"):
        btf.member_offset("outer", "flags")
    with pytest.raises(BTFError, match="no member 'nope'"):
        btf.member_offset("outer", "nope")
    with pytest.raises(BTFError, match="no struct or union named 'missing'"):
        btf.member_offset("missing", "a")
    with pytest.raises(BTFError, match="no enum value"):
        btf.enum_value("NOPE")
    assert not btf.has_member("outer", "a.b")
    assert btf.func_arg_count("tcp_conn_request") is None
    with pytest.raises(BTFError, match="magic"):
        BTF.from_bytes(b"\0" * 64)
    with pytest.raises(BTFError, match="too short"):
        BTF.from_bytes(b"\x9f\xeb")
