"""A pure-Python reader of BTF, the kernel's BPF Type Format.

It answers what acceptrace needs to know about a kernel without its headers:
byte offsets and sizes of (nested) struct members, enumerator values and
function prototypes.  The format is described in Documentation/bpf/btf.rst of
the Linux sources: a header, a type section (variable-length records, type id
N is the N-th record, id 0 is ``void``) and a string section.  Both byte
orders are read (the magic 0xeB9F tells which).

Input: a raw BTF blob (``/sys/kernel/btf/vmlinux``), the same xz-compressed
(``.xz``), or an ELF file (a ``vmlinux``) whose ``.BTF`` section is used.

Speed: loading walks the type section once, recording where each type starts
(~40 ms for the ~130k types of a 6.x vmlinux); the name -> id dictionaries
(structs/unions, functions, enumerators) are each built on first use.

Name clashes, and which one wins:

* struct/union names: vmlinux has a few duplicates (file-local structs such as
  ``console``, ``workspace``, ``dir_entry``).  Only complete definitions count
  (a FWD declaration never does); among them the one with the most members
  wins, then the larger size, then the lower type id.
* enumerator names: searched across all ENUM and ENUM64 types; if a name occurs
  in several (file-local ``Opt_*`` enums do) the lowest type id wins.
* function names: the lowest type id wins (vmlinux has no duplicates).

Member paths are dotted (``"icsk_accept_queue.rskq_accept_tail"``).  Each step
looks into anonymous struct/union members transparently (a named member at the
current level is preferred) and follows typedefs and const/volatile/restrict/
type-tag qualifiers to reach the struct of the next step; it never dereferences
a pointer.
"""

from __future__ import annotations

import lzma
import os
import struct
from pathlib import Path
from typing import NamedTuple

__all__ = ["BTF", "BTFError", "FuncProto"]

BTF_MAGIC = 0xEB9F
_XZ_MAGIC = b"\xfd7zXZ\x00"
_ELF_MAGIC = b"\x7fELF"

KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM = 1, 2, 3, 4, 5, 6
KIND_FWD, KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT = 7, 8, 9, 10, 11
KIND_FUNC, KIND_FUNC_PROTO, KIND_VAR, KIND_DATASEC, KIND_FLOAT = 12, 13, 14, 15, 16
KIND_DECL_TAG, KIND_TYPE_TAG, KIND_ENUM64 = 17, 18, 19

KIND_NAMES = {
    KIND_INT: "INT", KIND_PTR: "PTR", KIND_ARRAY: "ARRAY", KIND_STRUCT: "STRUCT",
    KIND_UNION: "UNION", KIND_ENUM: "ENUM", KIND_FWD: "FWD", KIND_TYPEDEF: "TYPEDEF",
    KIND_VOLATILE: "VOLATILE", KIND_CONST: "CONST", KIND_RESTRICT: "RESTRICT",
    KIND_FUNC: "FUNC", KIND_FUNC_PROTO: "FUNC_PROTO", KIND_VAR: "VAR",
    KIND_DATASEC: "DATASEC", KIND_FLOAT: "FLOAT", KIND_DECL_TAG: "DECL_TAG",
    KIND_TYPE_TAG: "TYPE_TAG", KIND_ENUM64: "ENUM64",
}

# Size of each kind's record after the 12-byte struct btf_type: fixed bytes plus
# bytes per vlen entry; indexed by kind (0 is not a valid kind).
_FIXED: list[int] = [-1, 4, 0, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 4, 0, 0]
_PER_VLEN: list[int] = [0, 0, 0, 0, 12, 12, 8, 0, 0, 0, 0, 0, 0, 8, 0, 12, 0, 0, 0, 12]

# Kinds that only rename or qualify another type (size_or_type is a type id).
_MODIFIERS = frozenset({KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG})
_COMPOSITE = (KIND_STRUCT, KIND_UNION)
_MAX_DEPTH = 64


class BTFError(Exception):
    """Malformed BTF, or a type/member/enumerator/function that is not there."""


class FuncProto(NamedTuple):
    """A BTF function: its arguments as (name, C type) pairs and its return type.

    An unnamed argument has name ``""``; a variadic function ends with
    ``("", "...")``.
    """

    name: str
    args: list[tuple[str, str]]
    ret: str


class _Member(NamedTuple):
    name: str
    type_id: int
    bit_offset: int     # from the start of the containing struct/union
    bitfield_size: int  # 0 when not a bitfield


class BTF:
    """Parsed BTF; see the module docstring.  Build with :meth:`load` or :meth:`from_bytes`."""

    def __init__(self, data: bytes) -> None:
        data = bytes(data)
        if len(data) < 24:
            raise BTFError(f"not BTF: {len(data)} bytes is too short for a BTF header")
        if struct.unpack_from("<H", data, 0)[0] == BTF_MAGIC:
            e = "<"
        elif struct.unpack_from(">H", data, 0)[0] == BTF_MAGIC:
            e = ">"
        else:
            raise BTFError(f"not BTF: bad magic 0x{data[:2].hex()} (want 0xeb9f)")
        version = data[2]
        if version != 1:
            raise BTFError(f"unsupported BTF version {version}")
        hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(e + "5I", data, 4)
        if hdr_len < 24:
            raise BTFError(f"malformed BTF: header length {hdr_len} < 24")
        types_start, strs_start = hdr_len + type_off, hdr_len + str_off
        if types_start + type_len > len(data) or strs_start + str_len > len(data):
            raise BTFError(
                f"malformed BTF: type/string sections run past the end ({len(data)} bytes)"
            )
        if type_off % 4:
            raise BTFError("malformed BTF: type section is not 4-byte aligned")
        self._e = e
        self._data = data
        self._strs = data[strs_start:strs_start + str_len]
        self._types_start, self._types_end = types_start, types_start + type_len
        self._index_types()
        self._names_by_group: dict[str, dict[str, int]] = {}
        self._enum_values: dict[str, int] | None = None
        self._ptr_size: int | None = None

    # -- loading -------------------------------------------------------------------

    @classmethod
    def from_bytes(cls, data: bytes) -> BTF:
        """Parse BTF from memory: raw BTF, xz-compressed BTF, or an ELF file with .BTF."""
        data = bytes(data)
        if data[:6] == _XZ_MAGIC:
            try:
                data = lzma.decompress(data)
            except lzma.LZMAError as exc:
                raise BTFError(f"cannot decompress xz data: {exc}") from None
        if data[:4] == _ELF_MAGIC:
            data = _elf_section(data, ".BTF")
        return cls(data)

    @classmethod
    def load(cls, path: str | os.PathLike[str] = "/sys/kernel/btf/vmlinux") -> BTF:
        """Read a raw BTF file, the same compressed as ``*.xz``, or an ELF file with .BTF.

        OSError (missing file, no permission) propagates unchanged.
        """
        data = Path(path).read_bytes()
        if str(path).endswith(".xz") and data[:6] != _XZ_MAGIC:
            raise BTFError(f"{path}: not an xz file")
        return cls.from_bytes(data)

    def _index_types(self) -> None:
        """Walk the type section once: record offset, info and size_or_type per id."""
        data = self._data
        unpack = struct.Struct(self._e + "III").unpack_from
        fixed, per_vlen = _FIXED, _PER_VLEN
        off, end = self._types_start, self._types_end
        offs: list[int] = [0]   # id 0 is void
        infos: list[int] = [0]
        names: list[int] = [0]
        sts: list[int] = [0]
        o_app, i_app, n_app, s_app = offs.append, infos.append, names.append, sts.append
        try:
            while off < end:
                name_off, info, st = unpack(data, off)
                kind = (info >> 24) & 0x1F
                o_app(off)
                i_app(info)
                n_app(name_off)
                s_app(st)
                off += 12 + fixed[kind] + per_vlen[kind] * (info & 0xFFFF)
                if kind == 0:
                    raise IndexError
        except (IndexError, struct.error):
            raise BTFError(
                f"malformed BTF: bad type record #{len(offs) - 1} at byte {offs[-1]}"
            ) from None
        if off != end:
            raise BTFError("malformed BTF: last type record runs past the type section")
        self._offs, self._infos, self._name_offs, self._sts = offs, infos, names, sts

    # -- low-level accessors ---------------------------------------------------------

    def __len__(self) -> int:
        """Number of types, not counting void (id 0)."""
        return len(self._offs) - 1

    def _str(self, off: int) -> str:
        if off >= len(self._strs):
            raise BTFError(f"malformed BTF: string offset {off} out of range "
                           "(split/module BTF needs its vmlinux base)")
        end = self._strs.find(b"\0", off)
        return self._strs[off:end if end >= 0 else None].decode("utf-8", "replace")

    def _check(self, tid: int) -> int:
        if not 0 <= tid < len(self._offs):
            raise BTFError(f"malformed BTF: type id {tid} out of range (have {len(self)} types;"
                           " split/module BTF needs its vmlinux base)")
        return tid

    def kind(self, tid: int) -> int:
        """The BTF kind number of type ``tid`` (0 for void)."""
        return (self._infos[self._check(tid)] >> 24) & 0x1F

    def _vlen(self, tid: int) -> int:
        return self._infos[tid] & 0xFFFF

    def _kflag(self, tid: int) -> bool:
        return bool(self._infos[tid] >> 31)

    def name(self, tid: int) -> str:
        """The name of type ``tid`` ("" if anonymous or void)."""
        return self._str(self._name_offs[self._check(tid)]) if tid else ""

    def _words(self, tid: int, fmt: str, rel: int = 0) -> tuple[int, ...]:
        return struct.unpack_from(self._e + fmt, self._data, self._offs[tid] + 12 + rel)

    def _strip(self, tid: int) -> int:
        """Follow typedefs and qualifiers (const, volatile, restrict, type tags)."""
        for _ in range(_MAX_DEPTH):
            if not tid or self.kind(tid) not in _MODIFIERS:
                return tid
            tid = self._sts[tid]
        raise BTFError(f"malformed BTF: typedef/qualifier chain too long at type {tid}")

    def _describe(self, tid: int) -> str:
        """A short human name for error messages: 'struct sock', 'union (anon) #123'."""
        s = self.type_str(tid)
        return f"{s} #{tid}" if "(anon)" in s else s

    # -- name indexes ------------------------------------------------------------------

    def _names(self, group: str) -> dict[str, int]:
        idx = self._names_by_group.get(group)
        if idx is None:
            idx = self._build_index(group)
            self._names_by_group[group] = idx
        return idx

    def _build_index(self, group: str) -> dict[str, int]:
        kinds = {"struct": (KIND_STRUCT, KIND_UNION), "func": (KIND_FUNC,),
                 "typedef": (KIND_TYPEDEF,)}[group]
        wanted = {k << 24 for k in kinds}
        infos, name_offs = self._infos, self._name_offs
        idx: dict[str, int] = {}
        for tid in range(1, len(infos)):
            if (infos[tid] & 0x1F000000) in wanted and name_offs[tid]:
                name = self._str(name_offs[tid])
                prev = idx.get(name)
                if prev is None or (group == "struct" and self._rank(tid) > self._rank(prev)):
                    idx[name] = tid
        return idx

    def _rank(self, tid: int) -> tuple[int, int]:
        # most members, then larger size; ties keep the lower id (the first seen)
        return self._vlen(tid), self._sts[tid]

    def _struct_id(self, name: str) -> int:
        for prefix in ("struct ", "union "):
            if name.startswith(prefix):
                name = name[len(prefix):].strip()
        tid = self._names("struct").get(name)
        if tid is None:
            raise BTFError(f"BTF has no struct or union named {name!r}")
        return tid

    def _enums(self) -> dict[str, int]:
        if self._enum_values is None:
            vals: dict[str, int] = {}
            infos = self._infos
            for tid in range(1, len(infos)):
                kind = (infos[tid] >> 24) & 0x1F
                if kind != KIND_ENUM and kind != KIND_ENUM64:
                    continue
                for name, value in self._enumerators(tid):
                    vals.setdefault(name, value)
            self._enum_values = vals
        return self._enum_values

    def _enumerators(self, tid: int) -> list[tuple[str, int]]:
        """(name, value) of an ENUM/ENUM64; kind_flag set means signed values."""
        signed = self._kflag(tid)
        vlen = self._vlen(tid)
        base = self._offs[tid] + 12
        out = []
        if self.kind(tid) == KIND_ENUM:
            fmt = self._e + ("Ii" if signed else "II")
            for i in range(vlen):
                name_off, value = struct.unpack_from(fmt, self._data, base + 8 * i)
                out.append((self._str(name_off), value))
        else:
            fmt = self._e + "III"
            for i in range(vlen):
                name_off, lo, hi = struct.unpack_from(fmt, self._data, base + 12 * i)
                value = (hi << 32) | lo
                if signed and value >= 1 << 63:
                    value -= 1 << 64
                out.append((self._str(name_off), value))
        return out

    # -- sizes ---------------------------------------------------------------------------

    def _pointer_size(self) -> int:
        """BTF does not record it: use the size of ``long`` (as libbpf does), else 8."""
        if self._ptr_size is None:
            self._ptr_size = 8
            for tid in range(1, len(self._infos)):
                if (self._infos[tid] >> 24) & 0x1F == KIND_INT and self._name_offs[tid]:
                    if self._str(self._name_offs[tid]) in ("long int", "long unsigned int"):
                        self._ptr_size = self._sts[tid]
                        break
        return self._ptr_size

    def type_size(self, tid: int) -> int:
        """Size in bytes of type ``tid`` (typedefs resolved, arrays = element size * count)."""
        depth = 0
        mult = 1
        while True:
            tid = self._strip(tid)
            kind = self.kind(tid)
            if kind in (KIND_INT, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_ENUM64, KIND_FLOAT,
                        KIND_DATASEC):
                return mult * self._sts[tid]
            if kind == KIND_PTR:
                return mult * self._pointer_size()
            if kind == KIND_ARRAY:
                elem, _index_type, nelems = self._words(tid, "III")
                mult *= nelems
                tid = elem
            elif kind == KIND_VAR:
                tid = self._sts[tid]
            else:
                what = "void" if tid == 0 else f"{self._describe(tid)} ({KIND_NAMES[kind]})"
                raise BTFError(f"{what} has no size")
            depth += 1
            if depth > _MAX_DEPTH:
                raise BTFError(f"malformed BTF: array nesting too deep at type {tid}")

    # -- structs -------------------------------------------------------------------------

    def _members(self, tid: int) -> list[_Member]:
        """Members of STRUCT/UNION ``tid``, each with its bit offset and bitfield size.

        With kind_flag set, the offset word holds bitfield_size << 24 | bit_offset.
        Without it, a bitfield shows as an INT member type whose encoding has a bit
        offset or fewer bits than its size (the pre-kind_flag encoding).
        """
        kflag = self._kflag(tid)
        fmt = self._e + "III"
        base = self._offs[tid] + 12
        data = self._data
        out = []
        for i in range(self._vlen(tid)):
            name_off, mtype, moff = struct.unpack_from(fmt, data, base + 12 * i)
            name = self._str(name_off) if name_off else ""
            if kflag:
                out.append(_Member(name, mtype, moff & 0xFFFFFF, moff >> 24))
                continue
            bits = 0
            sub = self._strip(mtype)
            if sub and self.kind(sub) == KIND_INT:
                (enc,) = self._words(sub, "I")
                int_off, nr_bits = (enc >> 16) & 0xFF, enc & 0xFF
                if int_off or nr_bits != 8 * self._sts[sub]:
                    moff += int_off
                    bits = nr_bits
            out.append(_Member(name, mtype, moff, bits))
        return out

    def _find_member(self, tid: int, name: str, depth: int = 0) -> tuple[int, _Member] | None:
        """(bit offset within ``tid``, member) for ``name``, looking into anonymous members."""
        members = self._members(tid)
        for m in members:
            if m.name == name:
                return m.bit_offset, m
        if depth > _MAX_DEPTH:
            return None
        for m in members:
            if not m.name:
                sub = self._strip(m.type_id)
                if self.kind(sub) in _COMPOSITE:
                    found = self._find_member(sub, name, depth + 1)
                    if found is not None:
                        return m.bit_offset + found[0], found[1]
        return None

    def _resolve(self, struct_name: str, path: str) -> tuple[int, _Member]:
        """(total bit offset, final member) of dotted ``path`` in struct/union ``struct_name``."""
        tid = self._struct_id(struct_name)
        where = self._describe(tid)
        bits = 0
        member: _Member | None = None
        steps = path.split(".")
        if not path or not all(steps):
            raise BTFError(f"bad member path {path!r} for {where}")
        for i, step in enumerate(steps):
            if member is not None:
                tid = self._strip(member.type_id)
                if self.kind(tid) not in _COMPOSITE:
                    done = ".".join(steps[:i])
                    hint = " (member paths do not follow pointers)" if tid and (
                        self.kind(tid) == KIND_PTR) else ""
                    raise BTFError(
                        f"{where}.{done} is {self.type_str(member.type_id)}, not a struct/union: "
                        f"cannot look up {step!r}{hint}"
                    )
            found = self._find_member(tid, step)
            if found is None:
                inside = "" if i == 0 else f" (no {step!r} in {self._describe(tid)})"
                raise BTFError(f"{where} has no member {'.'.join(steps[:i + 1])!r}{inside}")
            bits += found[0]
            member = found[1]
        assert member is not None
        return bits, member

    def has_struct(self, name: str) -> bool:
        """True if a complete struct or union of that name is defined ("struct " prefix ok)."""
        try:
            self._struct_id(name)
        except BTFError:
            return False
        return True

    def struct_size(self, name: str) -> int:
        """Size in bytes of struct or union ``name``."""
        return self._sts[self._struct_id(name)]

    def member_offset(self, struct: str, path: str) -> int:
        """Byte offset of a (dotted, nested) member; BTFError if missing or a bitfield."""
        bits, m = self._resolve(struct, path)
        if m.bitfield_size or bits % 8:
            raise BTFError(
                f"{self._describe(self._struct_id(struct))}.{path} is a bitfield "
                f"(bit offset {bits}, {m.bitfield_size or '?'} bits): no byte offset"
            )
        return bits // 8

    def member_size(self, struct: str, path: str) -> int:
        """Size in bytes of the member's type; BTFError if missing or a bitfield."""
        _bits, m = self._resolve(struct, path)
        if m.bitfield_size:
            raise BTFError(
                f"{self._describe(self._struct_id(struct))}.{path} is a bitfield of "
                f"{m.bitfield_size} bits: no byte size"
            )
        return self.type_size(m.type_id)

    def has_member(self, struct: str, path: str) -> bool:
        """True if the member exists (bitfields included)."""
        try:
            self._resolve(struct, path)
        except BTFError:
            return False
        return True

    # -- enums ---------------------------------------------------------------------------

    def enum_value(self, name: str) -> int:
        """Value of enumerator ``name`` (any ENUM or ENUM64; signed per kind_flag)."""
        try:
            return self._enums()[name]
        except KeyError:
            raise BTFError(f"BTF has no enum value {name!r}") from None

    def has_enum_value(self, name: str) -> bool:
        return name in self._enums()

    # -- functions -------------------------------------------------------------------------

    def has_func(self, name: str) -> bool:
        """True if BTF has a FUNC of that name."""
        return name in self._names("func")

    def func_proto(self, name: str) -> FuncProto:
        """Arguments and return type of FUNC ``name``."""
        fid = self._names("func").get(name)
        if fid is None:
            raise BTFError(f"BTF has no function {name!r}")
        pid = self._sts[fid]
        if self.kind(pid) != KIND_FUNC_PROTO:
            raise BTFError(f"malformed BTF: function {name!r} has no FUNC_PROTO")
        return FuncProto(name, self._params(pid), self.type_str(self._sts[pid]))

    def func_arg_count(self, name: str) -> int | None:
        """Number of arguments of FUNC ``name`` (a variadic "..." counts as one), or None."""
        fid = self._names("func").get(name)
        if fid is None:
            return None
        return len(self.func_proto(name).args)

    def raw_tracepoint_args(self, name: str) -> list[str] | None:
        """The argument types a raw tracepoint's program gets in ``ctx->args[]`` (its
        TP_PROTO), from the kernel's ``btf_trace_<name>`` typedef -- a pointer to
        ``void (*)(void *__data, <TP_PROTO>)`` -- or None if there is no such
        tracepoint."""
        tid = self._names("typedef").get(f"btf_trace_{name}")
        if tid is None:
            return None
        ptr = self._sts[tid]
        if self.kind(ptr) != KIND_PTR or self.kind(self._sts[ptr]) != KIND_FUNC_PROTO:
            raise BTFError(f"malformed BTF: btf_trace_{name} is not a function pointer")
        return [t for _, t in self._params(self._sts[ptr])[1:]]

    def _params(self, pid: int) -> list[tuple[str, str]]:
        args = []
        fmt = self._e + "II"
        base = self._offs[pid] + 12
        for i in range(self._vlen(pid)):
            name_off, atype = struct.unpack_from(fmt, self._data, base + 8 * i)
            if atype == 0 and not name_off:
                args.append(("", "..."))
            else:
                args.append((self._str(name_off) if name_off else "", self.type_str(atype)))
        return args

    # -- C-ish type strings ----------------------------------------------------------------

    def type_str(self, tid: int) -> str:
        """A C spelling of type ``tid``: "struct sock *", "char[16]", "int (*)(void *)"."""
        return self._decl(tid, "", 0)

    def _decl(self, tid: int, inner: str, depth: int) -> str:
        """C declarator syntax: ``inner`` is what the type is applied to ("*", "[4]"...)."""

        def base(spelling: str) -> str:
            if not inner:
                return spelling
            return spelling + ("" if inner.startswith("[") else " ") + inner

        def wrap() -> str:  # a pointer inside an array/function declarator needs parens
            return f"({inner})" if inner.startswith("*") else inner

        if depth > _MAX_DEPTH:
            return base("...")
        if tid == 0:
            return base("void")
        kind = self.kind(tid)
        name = self.name(tid) or "(anon)"
        nxt = self._sts[tid]
        if kind in (KIND_INT, KIND_FLOAT, KIND_TYPEDEF):
            return base(name)
        if kind in (KIND_STRUCT, KIND_UNION, KIND_FWD):
            is_union = kind == KIND_UNION or (kind == KIND_FWD and self._kflag(tid))
            return base(("union " if is_union else "struct ") + name)
        if kind in (KIND_ENUM, KIND_ENUM64):
            return base("enum " + name)
        if kind == KIND_PTR:
            return self._decl(nxt, "*" + inner, depth + 1)
        if kind in (KIND_CONST, KIND_VOLATILE, KIND_RESTRICT):
            qual = {KIND_CONST: "const", KIND_VOLATILE: "volatile", KIND_RESTRICT: "restrict"}
            if nxt and self.kind(nxt) == KIND_PTR:  # qualifies the pointer: "char *const"
                return self._decl(nxt, (qual[kind] + " " + inner).strip(), depth + 1)
            return qual[kind] + " " + self._decl(nxt, inner, depth + 1)
        if kind == KIND_TYPE_TAG:
            return self._decl(nxt, inner, depth + 1)
        if kind == KIND_ARRAY:
            elem, _index_type, nelems = self._words(tid, "III")
            return self._decl(elem, f"{wrap()}[{nelems}]", depth + 1)
        if kind == KIND_FUNC_PROTO:
            params = ", ".join(t for _n, t in self._params(tid)) or "void"
            return self._decl(nxt, f"{wrap()}({params})", depth + 1)
        if kind in (KIND_FUNC, KIND_VAR):
            return self._decl(nxt, (name + " " + inner).strip(), depth + 1)
        return base(f"{KIND_NAMES.get(kind, kind)} {name}")


def _elf_section(data: bytes, wanted: str) -> bytes:
    """Contents of the ELF section named ``wanted`` (ELF32/ELF64, either byte order)."""
    if len(data) < 52:
        raise BTFError("truncated ELF file")
    elf_class, elf_data = data[4], data[5]
    if elf_class not in (1, 2) or elf_data not in (1, 2):
        raise BTFError(f"unsupported ELF class/data {elf_class}/{elf_data}")
    e = "<" if elf_data == 1 else ">"
    if elf_class == 2:
        shoff = struct.unpack_from(e + "Q", data, 0x28)[0]
        shentsize, shnum, shstrndx = struct.unpack_from(e + "HHH", data, 0x3A)
        sh_fmt = e + "IIQQQQIIQQ"
    else:
        shoff = struct.unpack_from(e + "I", data, 0x20)[0]
        shentsize, shnum, shstrndx = struct.unpack_from(e + "HHH", data, 0x2E)
        sh_fmt = e + "IIIIIIIIII"
    need = struct.calcsize(sh_fmt)
    if shoff == 0 or shentsize < need:
        raise BTFError("ELF file has no section header table")

    def header(i: int) -> tuple[int, ...]:
        at = shoff + i * shentsize
        if at + need > len(data):
            raise BTFError("truncated ELF section header table")
        # name, type, flags, addr, offset, size, link, info, addralign, entsize
        return struct.unpack_from(sh_fmt, data, at)

    if shnum == 0 or shstrndx == 0xFFFF:  # extended numbering lives in section 0
        sec0 = header(0)
        shnum = shnum or sec0[5]
        if shstrndx == 0xFFFF:
            shstrndx = sec0[6]
    strtab = header(shstrndx)
    names = data[strtab[4]:strtab[4] + strtab[5]]
    for i in range(shnum):
        sh = header(i)
        name_off, sh_type, off, size = sh[0], sh[1], sh[4], sh[5]
        end = names.find(b"\0", name_off)
        if names[name_off:end if end >= 0 else None] == wanted.encode():
            if sh_type == 8:  # SHT_NOBITS
                raise BTFError(f"ELF section {wanted} has no contents (NOBITS)")
            if off + size > len(data):
                raise BTFError(f"ELF section {wanted} runs past the end of the file")
            return data[off:off + size]
    raise BTFError(f"ELF file has no {wanted} section")
