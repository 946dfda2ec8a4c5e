"""The pure-Python BTF reader (acceptrace.btf).

1. The running kernel's /sys/kernel/btf/vmlinux, checked against bpftool (an
   independent BTF implementation, libbpf's) -- offsets are summed here from
   bpftool's per-member bits_offset, anonymous members walked here too.
2. Debian bookworm's 6.1 kernel (tests/fixtures/btf-debian-6.1-amd64.xz, made
   by tests/fixtures/make-btf-fixture.sh): bpftool again, plus known answers.
3. Small hand-built BTF blobs for the corner cases.
"""

from __future__ import annotations

import json
import lzma
import os
import shutil
import struct
import subprocess
import time
from functools import lru_cache
from pathlib import Path

import pytest
from acceptrace.btf import BTF, BTFError, FuncProto

VMLINUX = Path("/sys/kernel/btf/vmlinux")
FIXTURE_61 = Path(__file__).parent / "fixtures" / "btf-debian-6.1-amd64.xz"

# (struct, dotted member path) -- what acceptrace reads, and some neighbours.
MEMBERS = [
    ("sock", "__sk_common.skc_num"),
    ("sock", "__sk_common.skc_state"),
    ("sock", "__sk_common.skc_family"),
    ("sock", "__sk_common.skc_dport"),
    ("sock", "__sk_common.skc_daddr"),
    ("sock", "__sk_common.skc_rcv_saddr"),
    ("sock", "__sk_common.skc_v6_daddr"),
    ("sock", "__sk_common.skc_v6_rcv_saddr"),
    ("sock", "sk_ack_backlog"),
    ("sock", "sk_max_ack_backlog"),
    ("sock", "sk_drops"),
    ("inet_connection_sock", "icsk_accept_queue.rskq_accept_tail"),
    ("inet_connection_sock", "icsk_accept_queue.rskq_accept_head"),
    ("inet_connection_sock", "icsk_accept_queue.qlen"),
    ("request_sock", "sk"),
    # `rsk_listener` is a C macro for __req_common.skc_listener: BTF only has the latter.
    ("request_sock", "__req_common.skc_listener"),
    ("request_sock", "num_retrans"),
    ("tcp_request_sock", "snt_synack"),
    ("task_struct", "files"),
    ("files_struct", "fdt"),
    ("fdtable", "fd"),
    ("fdtable", "max_fds"),
    ("file", "private_data"),
    ("socket", "sk"),
    ("sk_buff", "head"),
    ("sk_buff", "transport_header"),
]
ENUMS = ["SKB_DROP_REASON_TCP_LISTEN_OVERFLOW", "TCP_LISTEN", "TCP_ESTABLISHED",
         "TCP_SYN_RECV", "TCP_CLOSE"]
FUNCS = ["tcp_conn_request", "inet_csk_accept", "tcp_v4_syn_recv_sock"]


def member_id(param: tuple[str, str]) -> str:
    return f"{param[0]}.{param[1]}"


# ---- the bpftool oracle ---------------------------------------------------------------


def need_bpftool() -> None:
    if not shutil.which("bpftool"):
        pytest.skip("bpftool not installed (the oracle; `make setup` installs it)")


@lru_cache(maxsize=4)
def bpftool_db(path: str) -> dict:
    """`bpftool -j btf dump file PATH`: {"types": [{"id", "kind", "name", ...}, ...]}."""
    out = subprocess.run(["bpftool", "-j", "btf", "dump", "file", path],
                         capture_output=True, text=True, check=True).stdout
    types = json.loads(out)["types"]
    db: dict = {"by_id": {t["id"]: t for t in types}, "structs": {}, "enums": {}, "funcs": {}}
    for t in types:
        kind, name = t["kind"], t.get("name", "(anon)")
        if kind in ("STRUCT", "UNION") and name != "(anon)":
            db["structs"].setdefault(name, []).append(t)
        elif kind in ("ENUM", "ENUM64"):
            for v in t["values"]:
                val = v["val"]
                if kind == "ENUM" and t.get("encoding") == "UNSIGNED":
                    # bpftool 7.1 sign-extends a 32-bit unsigned value >= 2**31 to 64 bits
                    val &= 0xFFFFFFFF
                db["enums"].setdefault(v["name"], set()).add(val)
        elif kind == "FUNC":
            db["funcs"].setdefault(name, []).append(t)
    return db


def oracle_struct(db: dict, name: str) -> dict:
    defs = db["structs"][name]
    # the structs tested here are unique, so no tie-breaking rule is tested twice
    assert len(defs) == 1, f"bpftool: {len(defs)} definitions of {name}"
    return defs[0]


def oracle_strip(db: dict, tid: int) -> dict:
    t = db["by_id"][tid]
    while t["kind"] in ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"):
        t = db["by_id"][t["type_id"]]
    return t


def oracle_find(db: dict, t: dict, name: str) -> tuple[int, dict] | None:
    """(bits offset, member) of `name` in struct/union t, through anonymous members."""
    for m in t["members"]:
        if m["name"] == name:
            return m["bits_offset"], m
    for m in t["members"]:
        if m["name"] == "(anon)":
            sub = oracle_strip(db, m["type_id"])
            if sub["kind"] in ("STRUCT", "UNION"):
                found = oracle_find(db, sub, name)
                if found:
                    return m["bits_offset"] + found[0], found[1]
    return None


def oracle_size(db: dict, tid: int) -> int:
    t = oracle_strip(db, tid)
    if t["kind"] == "PTR":
        return 8
    if t["kind"] == "ARRAY":
        return t["nr_elems"] * oracle_size(db, t["type_id"])
    return t["size"]


def oracle_member(db: dict, struct_name: str, path: str) -> tuple[int, int]:
    """(byte offset, byte size) of a dotted member path, from bpftool's output."""
    t, bits, member = oracle_struct(db, struct_name), 0, None
    for step in path.split("."):
        if member is not None:
            t = oracle_strip(db, member["type_id"])
        found = oracle_find(db, t, step)
        assert found, f"bpftool has no {struct_name}.{path}"
        bits += found[0]
        member = found[1]
    assert member is not None and "bitfield_size" not in member and bits % 8 == 0
    return bits // 8, oracle_size(db, member["type_id"])


def oracle_enum(db: dict, name: str) -> int | None:
    vals = db["enums"].get(name)
    if vals is None:
        return None
    assert len(vals) == 1, f"bpftool: {name} has values {vals}"
    return next(iter(vals))


def oracle_func(db: dict, name: str) -> list[str] | None:
    funcs = db["funcs"].get(name)
    if funcs is None:
        return None
    assert len(funcs) == 1, f"bpftool: {len(funcs)} FUNCs named {name}"
    proto = db["by_id"][funcs[0]["type_id"]]
    return [p["name"] for p in proto["params"]]


# ---- 1. the running kernel --------------------------------------------------------------


def kernel_version() -> tuple[int, int]:
    major, minor = os.uname().release.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


@pytest.fixture(scope="module")
def btf_here() -> BTF:
    if not VMLINUX.exists():
        pytest.skip(f"{VMLINUX} missing: this kernel has no BTF")
    return BTF.load(VMLINUX)


@pytest.fixture(scope="module")
def db_here(btf_here) -> dict:
    need_bpftool()
    return bpftool_db(str(VMLINUX))


@pytest.mark.parametrize("member", MEMBERS, ids=member_id)
def test_running_kernel_members_match_bpftool(btf_here, db_here, member):
    struct_name, path = member
    off, size = oracle_member(db_here, struct_name, path)
    assert btf_here.member_offset(struct_name, path) == off
    assert btf_here.member_size(struct_name, path) == size
    assert btf_here.has_member(struct_name, path)
    assert btf_here.struct_size(struct_name) == oracle_struct(db_here, struct_name)["size"]


def test_running_kernel_enums_and_funcs_match_bpftool(btf_here, db_here):
    for name in ENUMS:
        want = oracle_enum(db_here, name)
        assert btf_here.has_enum_value(name) == (want is not None), name
        if want is not None:
            assert btf_here.enum_value(name) == want, name
    for func in FUNCS:
        params = oracle_func(db_here, func)
        assert params is not None, func
        assert btf_here.has_func(func)
        assert btf_here.func_arg_count(func) == len(params), func
        assert [n for n, _t in btf_here.func_proto(func).args] == params, func


def test_running_kernel_known_answers(btf_here):
    assert btf_here.enum_value("TCP_ESTABLISHED") == 1
    assert btf_here.enum_value("TCP_SYN_RECV") == 3
    assert btf_here.enum_value("TCP_CLOSE") == 7
    assert btf_here.enum_value("TCP_LISTEN") == 10
    assert btf_here.func_arg_count("tcp_conn_request") == 4
    assert btf_here.func_arg_count("tcp_v4_syn_recv_sock") in (6, 7)
    assert not btf_here.has_member("request_sock", "rsk_listener")  # a macro, not a member
    assert btf_here.has_struct("sock") and not btf_here.has_struct("no_such_struct_xyz")
    assert btf_here.func_arg_count("no_such_function_xyz") is None
    accept = btf_here.func_proto("inet_csk_accept")
    assert accept.ret == "struct sock *" and accept.args[0] == ("sk", "struct sock *")
    if kernel_version() >= (6, 10):  # "net: have do_accept() take a struct proto_accept_arg"
        assert accept.args == [("sk", "struct sock *"), ("arg", "struct proto_accept_arg *")]
    if kernel_version()[:2] == (6, 18):
        assert btf_here.enum_value("SKB_DROP_REASON_TCP_LISTEN_OVERFLOW") == 40


def test_running_kernel_load_time(btf_here):
    t0 = time.perf_counter()
    btf = BTF.load(VMLINUX)
    loaded = time.perf_counter() - t0
    btf.member_offset("inet_connection_sock", "icsk_accept_queue.rskq_accept_tail")
    btf.enum_value("TCP_LISTEN")
    btf.func_arg_count("inet_csk_accept")
    total = time.perf_counter() - t0
    assert len(btf) > 50_000
    # ~40 ms to load and ~80 ms with all three name indexes built, on the dev VM
    assert loaded < 1.0 and total < 1.5, (loaded, total)


# ---- 2. Debian bookworm's 6.1 kernel --------------------------------------------------------


@pytest.fixture(scope="module")
def btf_61() -> BTF:
    return BTF.load(FIXTURE_61)


@pytest.fixture(scope="module")
def raw_61(tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("btf61") / "btf-debian-6.1.raw"
    raw.write_bytes(lzma.decompress(FIXTURE_61.read_bytes()))
    return raw


@pytest.fixture(scope="module")
def db_61(raw_61) -> dict:
    need_bpftool()
    return bpftool_db(str(raw_61))


@pytest.mark.parametrize("member", MEMBERS, ids=member_id)
def test_debian_61_members_match_bpftool(btf_61, db_61, member):
    struct_name, path = member
    off, size = oracle_member(db_61, struct_name, path)
    assert btf_61.member_offset(struct_name, path) == off
    assert btf_61.member_size(struct_name, path) == size


def test_debian_61_enums_and_funcs_match_bpftool(btf_61, db_61):
    for name in ENUMS:
        want = oracle_enum(db_61, name)
        assert btf_61.has_enum_value(name) == (want is not None), name
        if want is not None:
            assert btf_61.enum_value(name) == want, name
    for func in FUNCS:
        params = oracle_func(db_61, func)
        assert params is not None
        assert [n for n, _t in btf_61.func_proto(func).args] == params, func


def test_debian_61_known_answers(btf_61):
    # Values verified with bpftool on the fixture (linux-image-6.1.0-56-amd64 6.1.192-2).
    assert btf_61.func_proto("inet_csk_accept") == FuncProto(
        "inet_csk_accept",
        [("sk", "struct sock *"), ("flags", "int"), ("err", "int *"), ("kern", "bool")],
        "struct sock *",
    )
    assert btf_61.func_arg_count("inet_csk_accept") == 4
    assert btf_61.func_arg_count("tcp_conn_request") == 4
    # 7 on 6.1.192: the stable backport that added opt_child_init reached 6.1 too
    assert btf_61.func_arg_count("tcp_v4_syn_recv_sock") == 7
    assert not btf_61.has_enum_value("SKB_DROP_REASON_TCP_LISTEN_OVERFLOW")
    with pytest.raises(BTFError, match="no enum value 'SKB_DROP_REASON_TCP_LISTEN_OVERFLOW'"):
        btf_61.enum_value("SKB_DROP_REASON_TCP_LISTEN_OVERFLOW")
    assert btf_61.enum_value("TCP_LISTEN") == 10
    assert btf_61.member_offset("sock", "__sk_common.skc_num") == 14
    assert btf_61.member_offset("sock", "sk_ack_backlog") == 552
    assert btf_61.member_offset(
        "inet_connection_sock", "icsk_accept_queue.rskq_accept_tail") == 1024
    assert btf_61.member_offset("task_struct", "files") == 3048
    assert btf_61.member_size("sock", "__sk_common.skc_v6_daddr") == 16
    assert btf_61.struct_size("sock") == 776
    assert len(btf_61) == 100_750


def test_debian_61_raw_and_xz_agree(btf_61, raw_61):
    raw = BTF.load(raw_61)
    assert len(raw) == len(btf_61)
    assert raw.member_offset("file", "private_data") == btf_61.member_offset("file", "private_data")


# ---- 3. hand-built blobs ---------------------------------------------------------------------

INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)


class Blob:
    """A minimal BTF writer: add types in id order (1, 2, ...), then .build()."""

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

    def pack(self, fmt: str, *vals: int) -> bytes:
        return struct.pack(self.e + fmt, *vals)

    def add(self, kind: int, name: str = "", vlen: int = 0, size_or_type: int = 0,
            extra: bytes = b"", kflag: bool = False) -> int:
        info = (kind << 24) | vlen | (1 << 31 if kflag else 0)
        self.types += self.pack("III", self.s(name), info, size_or_type) + extra
        self.n += 1
        return self.n

    def int_(self, name: str, size: int, bits: int = 0, bit_offset: int = 0) -> int:
        return self.add(INT, name, 0, size, self.pack("I", bit_offset << 16 | (bits or size * 8)))

    def composite(self, name: str, size: int, members: list[tuple], union: bool = False,
                  kflag: bool | None = None) -> int:
        """members: (name, type id, bit offset[, bitfield size])."""
        if kflag is None:
            kflag = any(len(m) > 3 and m[3] for m in members)
        extra = b"".join(
            self.pack("III", self.s(m[0]), m[1], (m[3] << 24 | m[2]) if kflag else m[2])
            for m in [(*m, 0) if len(m) == 3 else m for m in members])
        return self.add(UNION if union else STRUCT, name, len(members), size, extra, kflag)

    def enum(self, name: str, values: list[tuple[str, int]], signed: bool = False) -> int:
        extra = b"".join(self.pack("Ii" if signed else "II", self.s(n), v) for n, v in values)
        return self.add(ENUM, name, len(values), 4, extra, signed)

    def enum64(self, name: str, values: list[tuple[str, int]], signed: bool = False) -> int:
        extra = b""
        for n, v in values:
            v &= (1 << 64) - 1
            extra += self.pack("III", self.s(n), v & 0xFFFFFFFF, v >> 32)
        return self.add(ENUM64, name, len(values), 8, extra, signed)

    def proto(self, ret: int, params: list[tuple[str, int]]) -> int:
        extra = b"".join(self.pack("II", self.s(n), t) for n, t in params)
        return self.add(FUNC_PROTO, "", len(params), ret, extra)

    def build(self) -> bytes:
        hdr = self.pack("HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(self.types),
                        len(self.types), len(self.strings))
        return hdr + self.types + self.strings


def build_sample(endian: str = "<") -> bytes:
    b = Blob(endian)
    u32 = b.int_("unsigned int", 4)
    u16 = b.int_("unsigned short", 2)
    u16_t = b.add(TYPEDEF, "__u16", size_or_type=u16)
    const_u16 = b.add(CONST, size_or_type=u16_t)
    # struct outer { u32 a; union { u32 both; struct { const __u16 lo; u16 hi; }; };
    #                u32 flags:3; u32 word; }
    anon_s = b.composite("", 4, [("lo", const_u16, 0), ("hi", u16, 16)])
    anon_u = b.composite("", 4, [("both", u32, 0), ("", anon_s, 0)], union=True)
    outer = b.composite("outer", 16, [("a", u32, 0), ("", anon_u, 32), ("flags", u32, 64, 3),
                                      ("word", u32, 96)])
    # the pre-kind_flag bitfield encoding: an INT of 8 bits in a 4-byte int, byte aligned
    u32_8bits = b.int_("unsigned int", 4, bits=8)
    b.composite("old_style", 12, [("x", u32, 0), ("b8", u32_8bits, 32), ("y", u32, 64)])
    # struct inner { void *p; u16 arr[3]; }; typedef struct inner inner_t;
    # struct holder { const volatile inner_t c; struct inner *ptr; u16x3_t t; }
    void_ptr = b.add(PTR, size_or_type=0)
    arr = b.add(ARRAY, extra=b.pack("III", u16, u32, 3))
    inner = b.composite("inner", 16, [("p", void_ptr, 0), ("arr", arr, 64)])
    inner_t = b.add(TYPEDEF, "inner_t", size_or_type=inner)
    cv_inner = b.add(CONST, size_or_type=b.add(VOLATILE, size_or_type=inner_t))
    inner_ptr = b.add(PTR, size_or_type=inner)
    u16x3_t = b.add(TYPEDEF, "u16x3_t", size_or_type=arr)
    b.composite("holder", 32, [("c", cv_inner, 0), ("ptr", inner_ptr, 128),
                               ("t", u16x3_t, 192)])
    # duplicates: a declaration and two definitions; the one with more members wins
    b.add(FWD, "dup")
    b.composite("dup", 4, [("a", u32, 0)])
    b.composite("dup", 8, [("a", u32, 0), ("b", u32, 32)])
    b.add(FWD, "only_declared")
    # every other kind, so a wrong record length shifts every later type id
    b.add(FLOAT, "double", size_or_type=8)
    var = b.add(VAR, "my_var", size_or_type=u32, extra=b.pack("I", 1))
    b.add(DATASEC, ".data", 1, 4, b.pack("III", var, 0, 4))
    b.add(DECL_TAG, "a_tag", size_or_type=outer, extra=b.pack("i", -1))
    user_u32 = b.add(TYPE_TAG, "user", size_or_type=u32)
    user_ptr = b.add(PTR, size_or_type=user_u32)
    b.add(RESTRICT, size_or_type=user_ptr)
    # enums: signed/unsigned 32 and 64 bit; a repeated name keeps the first value
    b.enum("small", [("SMALL_NEG", -3)], signed=True)
    b.enum("uns", [("U_BIG", 0xF0000000), ("SMALL_NEG", 99)])
    b.enum64("big", [("BIG_ONE", 1), ("BIG_HUGE", 1 << 32 | 5)])
    b.enum64("big_signed", [("NEG64", -5)], signed=True)
    # int my_func(const struct outer *sk, int (*cb)(unsigned int, void *), ...) and
    # void void_func(void)
    int_ = b.int_("int", 4)
    cb = b.add(PTR, size_or_type=b.proto(int_, [("", u32), ("", void_ptr)]))
    const_outer_ptr = b.add(PTR, size_or_type=b.add(CONST, size_or_type=outer))
    outer_ptr = b.add(PTR, size_or_type=outer)
    fproto = b.proto(outer_ptr, [("sk", const_outer_ptr), ("cb", cb), ("", 0)])
    b.add(FUNC, "my_func", size_or_type=fproto)
    b.add(FUNC, "void_func", size_or_type=b.proto(0, []))
    b.composite("sentinel", 4, [("last", u32, 0)])
    b.add(TYPEDEF, "long_t", size_or_type=b.int_("long int", 8))
    return b.build()


@pytest.fixture(params=["<", ">"], ids=["little-endian", "big-endian"])
def sample(request) -> BTF:
    return BTF.from_bytes(build_sample(request.param))


def test_blob_anonymous_members(sample):
    assert sample.member_offset("outer", "a") == 0
    assert sample.member_offset("outer", "both") == 4   # in the anonymous union
    assert sample.member_offset("outer", "lo") == 4     # union -> anonymous struct
    assert sample.member_offset("outer", "hi") == 6
    assert sample.member_offset("outer", "word") == 12
    assert sample.member_size("outer", "both") == 4
    assert sample.struct_size("outer") == 16
    assert not sample.has_member("outer", "")


def test_blob_typedef_and_qualifier_chains(sample):
    assert sample.member_size("outer", "lo") == 2       # const -> typedef -> u16
    assert sample.member_offset("holder", "c.arr") == 8  # const volatile inner_t -> inner
    assert sample.member_size("holder", "c.arr") == 6   # u16[3]
    assert sample.member_size("holder", "c.p") == 8     # pointer size = sizeof(long)
    assert sample.member_size("holder", "t") == 6       # typedef of an array
    assert sample.member_offset("holder", "t") == 24
    assert sample.struct_size("struct holder") == 32
    with pytest.raises(BTFError, match="do not follow pointers"):
        sample.member_offset("holder", "ptr.p")


def test_blob_bitfields_rejected(sample):
    with pytest.raises(BTFError) as exc:
        sample.member_offset("outer", "flags")
    assert str(exc.value) == (
        "struct outer.flags is a bitfield (bit offset 64, 3 bits): no byte offset")
    with pytest.raises(BTFError, match="bitfield of 3 bits"):
        sample.member_size("outer", "flags")
    assert sample.has_member("outer", "flags")          # it exists, it has no byte offset
    # the kind_flag=0 encoding: 8 bits, byte aligned, still a bitfield
    with pytest.raises(BTFError, match="old_style.b8 is a bitfield"):
        sample.member_offset("old_style", "b8")
    assert sample.member_offset("old_style", "y") == 8


def test_blob_enums(sample):
    assert sample.enum_value("SMALL_NEG") == -3          # signed ENUM; first of two wins
    assert sample.enum_value("U_BIG") == 0xF0000000      # unsigned ENUM
    assert sample.enum_value("BIG_ONE") == 1
    assert sample.enum_value("BIG_HUGE") == (1 << 32) + 5  # ENUM64 high word
    assert sample.enum_value("NEG64") == -5              # signed ENUM64
    assert sample.has_enum_value("BIG_HUGE") and not sample.has_enum_value("NOPE")


def test_blob_duplicates_and_declarations(sample):
    assert sample.struct_size("dup") == 8 and sample.has_member("dup", "b")
    assert not sample.has_struct("only_declared")        # a FWD is not a definition
    assert sample.has_struct("sentinel") and sample.member_offset("sentinel", "last") == 0


def test_blob_functions(sample):
    assert sample.func_proto("my_func") == FuncProto(
        "my_func",
        [("sk", "const struct outer *"), ("cb", "int (*)(unsigned int, void *)"), ("", "...")],
        "struct outer *",
    )
    assert sample.func_arg_count("my_func") == 3
    assert sample.func_proto("void_func") == FuncProto("void_func", [], "void")
    assert sample.func_arg_count("void_func") == 0
    assert sample.has_func("my_func") and not sample.has_func("outer")
    assert sample.func_arg_count("nope") is None


@pytest.mark.parametrize(("call", "message"), [
    (lambda b: b.member_offset("outer", "nope"), "struct outer has no member 'nope'"),
    (lambda b: b.member_size("holder", "c.nope"),
     "struct holder has no member 'c.nope' (no 'nope' in struct inner)"),
    (lambda b: b.member_offset("holder", "c.arr.x"),
     "struct holder.c.arr is unsigned short[3], not a struct/union: cannot look up 'x'"),
    (lambda b: b.member_offset("holder", "ptr.p"),
     "struct holder.ptr is struct inner *, not a struct/union: cannot look up 'p' "
     "(member paths do not follow pointers)"),
    (lambda b: b.member_offset("missing", "a"), "BTF has no struct or union named 'missing'"),
    (lambda b: b.struct_size("only_declared"),
     "BTF has no struct or union named 'only_declared'"),
    (lambda b: b.enum_value("NOPE"), "BTF has no enum value 'NOPE'"),
    (lambda b: b.func_proto("nope"), "BTF has no function 'nope'"),
])
def test_blob_error_messages(sample, call, message):
    with pytest.raises(BTFError) as exc:
        call(sample)
    assert str(exc.value) == message
    assert "\n" not in str(exc.value)


def test_blob_has_member_is_false_for_missing(sample):
    assert not sample.has_member("outer", "nope")
    assert not sample.has_member("missing", "a")
    assert not sample.has_member("holder", "ptr.p")


def test_big_and_little_endian_agree():
    le, be = build_sample("<"), build_sample(">")
    assert le != be and be[:2] == b"\xeb\x9f" and le[:2] == b"\x9f\xeb"
    a, b = BTF.from_bytes(le), BTF.from_bytes(be)
    assert len(a) == len(b)
    for i in range(1, len(a) + 1):
        assert a.type_str(i) == b.type_str(i)


def elf_with(section: bytes, elf64: bool = True, endian: str = "<") -> bytes:
    """A minimal ELF file: section headers for NULL, .text (empty), .BTF and .shstrtab."""
    shstrtab = b"\0.text\0.BTF\0.shstrtab\0"
    ehsize, shentsize = (64, 64) if elf64 else (52, 40)
    btf_off = ehsize
    str_off = btf_off + len(section)
    shoff = str_off + len(shstrtab)
    ident = b"\x7fELF" + bytes([2 if elf64 else 1, 1 if endian == "<" else 2, 1]) + bytes(9)
    if elf64:
        ehdr = ident + struct.pack(endian + "HHIQQQIHHHHHH", 2, 62, 1, 0, 0, shoff, 0,
                                   ehsize, 0, 0, shentsize, 4, 3)
        fmt = endian + "IIQQQQIIQQ"
    else:
        ehdr = ident + struct.pack(endian + "HHIIIIIHHHHHH", 2, 3, 1, 0, 0, shoff, 0,
                                   ehsize, 0, 0, shentsize, 4, 3)
        fmt = endian + "IIIIIIIIII"
    shdrs = struct.pack(fmt, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    shdrs += struct.pack(fmt, 1, 1, 0, 0, btf_off, 0, 0, 0, 1, 0)                # .text
    shdrs += struct.pack(fmt, 7, 1, 0, 0, btf_off, len(section), 0, 0, 4, 0)      # .BTF
    shdrs += struct.pack(fmt, 12, 3, 0, 0, str_off, len(shstrtab), 0, 0, 1, 0)    # .shstrtab
    return ehdr + section + shstrtab + shdrs


@pytest.mark.parametrize(("elf64", "endian"), [(True, "<"), (False, ">")],
                         ids=["elf64-le", "elf32-be"])
def test_load_elf_and_xz(tmp_path, elf64, endian):
    blob = build_sample(endian)
    elf = tmp_path / "vmlinux"
    elf.write_bytes(elf_with(blob, elf64, endian))
    xz = tmp_path / "btf.xz"
    xz.write_bytes(lzma.compress(blob))
    for btf in (BTF.load(elf), BTF.load(xz), BTF.from_bytes(lzma.compress(elf.read_bytes()))):
        assert btf.member_offset("outer", "hi") == 6
    no_btf = elf_with(blob, elf64, endian).replace(b".BTF\0", b".XYZ\0")
    with pytest.raises(BTFError, match="ELF file has no .BTF section"):
        BTF.from_bytes(no_btf)


def test_malformed_blobs(tmp_path):
    good = build_sample()
    with pytest.raises(BTFError, match="bad magic"):
        BTF.from_bytes(b"\0" * 64)
    with pytest.raises(BTFError, match="too short"):
        BTF.from_bytes(good[:10])
    with pytest.raises(BTFError, match="run past the end"):
        BTF.from_bytes(good[:-5])
    bad_kind = bytearray(good)
    bad_kind[24 + 4:24 + 8] = struct.pack("<I", 25 << 24)  # first type: kind 25
    with pytest.raises(BTFError, match="bad type record #1"):
        BTF.from_bytes(bytes(bad_kind))
    bad_version = bytearray(good)
    bad_version[2] = 2
    with pytest.raises(BTFError, match="unsupported BTF version 2"):
        BTF.from_bytes(bytes(bad_version))
    not_xz = tmp_path / "btf.xz"
    not_xz.write_bytes(good)
    with pytest.raises(BTFError, match="not an xz file"):
        BTF.load(not_xz)
    with pytest.raises(FileNotFoundError):
        BTF.load(tmp_path / "absent")


# ---- integration with kernel.resolve_offsets ----------------------------------------------


def test_resolve_offsets_on_both_kernels(btf_here, btf_61):
    kernel = pytest.importorskip("acceptrace.kernel")
    here, _ = kernel.resolve_offsets(btf_here)
    old, notes = kernel.resolve_offsets(btf_61)
    assert set(kernel.OFFSETS) <= set(here) and set(kernel.OFFSETS) <= set(old)
    assert "AT_DROP_REASON_LISTEN_OVERFLOW" in here
    assert "AT_DROP_REASON_LISTEN_OVERFLOW" not in old
    # Said where it matters: the tracepoint backend's note, not every backend's.
    assert not any("SKB_DROP_REASON_TCP_LISTEN_OVERFLOW" in n for n in notes)
    from acceptrace import selection

    assert "TCP_LISTEN_OVERFLOW" in selection.ACK_OVERFLOW_NOTE
    # the layouts differ between the two kernels: offsets must come from BTF
    assert any(here[k] != old[k] for k in kernel.OFFSETS)
