"""A pure-Python reader of BTF (the kernel's BPF Type Format).

It answers what acceptrace needs to know about the running kernel without
headers: byte offsets of (nested) struct members, enum values, and function
prototypes.  Format: Documentation/bpf/btf.rst in the Linux sources.

Loading scans the type section once to index where each type starts (fast:
the 6.x vmlinux BTF has ~100k+ types); names are indexed lazily per kind.

When a struct/union name occurs more than once (vmlinux has a few), the
complete definition with the most members wins.
"""

from __future__ import annotations

import lzma
import os
import struct
from pathlib import Path
from typing import NamedTuple

BTF_MAGIC = 0xEB9F

KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM = 1, 2, 3, 4, 5, 6
KIND_FWD, KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT = 7, 8, 9, 10, 11
KIND_FUNC, KIND_FUNC_PROTO, KIND_VAR, KIND_DATASEC, KIND_FLOAT = 12, 13, 14, 15, 16
KIND_DECL_TAG, KIND_TYPE_TAG, KIND_ENUM64 = 17, 18, 19

# Bytes of kind-specific data after the 12-byte common header: fixed + per-vlen.
_EXTRA: dict[int, tuple[int, int]] = {
    KIND_INT: (4, 0), KIND_PTR: (0, 0), KIND_ARRAY: (12, 0), KIND_STRUCT: (0, 12),
    KIND_UNION: (0, 12), KIND_ENUM: (0, 8), KIND_FWD: (0, 0), KIND_TYPEDEF: (0, 0),
    KIND_VOLATILE: (0, 0), KIND_CONST: (0, 0), KIND_RESTRICT: (0, 0), KIND_FUNC: (0, 0),
    KIND_FUNC_PROTO: (0, 8), KIND_VAR: (4, 0), KIND_DATASEC: (0, 12), KIND_FLOAT: (0, 0),
    KIND_DECL_TAG: (4, 0), KIND_TYPE_TAG: (0, 0), KIND_ENUM64: (0, 12),
}
_MODIFIERS = (KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG)


class BTFError(Exception):
    """Malformed BTF, or a type/member/enum that is not there."""


class FuncProto(NamedTuple):
    name: str
    args: list[tuple[str, str]]
    ret: str


class Member(NamedTuple):
    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int


class BTF:
    def __init__(self, data: bytes) -> None:
        if len(data) < 24:
            raise BTFError("file too short for a BTF header")
        magic_le = struct.unpack_from("<H", data, 0)[0]
        if magic_le == BTF_MAGIC:
            self._e = "<"
        elif struct.unpack_from(">H", data, 0)[0] == BTF_MAGIC:
            self._e = ">"
        else:
            raise BTFError(f"bad BTF magic {data[:2].hex()}")
        e = self._e
        hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(e + "5I", data, 4)
        base = hdr_len
        self._data = data
        self._types_start = base + type_off
        self._types_end = self._types_start + type_len
        self._strs = data[base + str_off : base + str_off + str_len]
        if self._types_end > len(data) or base + str_off + str_len > len(data):
            raise BTFError("BTF sections run past the end of the file")
        self._index()
        self._by_name: dict[int, dict[str, int]] = {}
        self._enum_values: dict[str, int] | None = None

    # -- loading ---------------------------------------------------------------------
    @classmethod
    def from_bytes(cls, data: bytes) -> BTF:
        if data[:6] == b"\xfd7zXZ\x00":
            data = lzma.decompress(data)
        if data[:4] == b"\x7fELF":
            data = _elf_section(data, ".BTF")
        return cls(data)

    @classmethod
    def load(cls, path: str | os.PathLike[str] = "/sys/kernel/btf/vmlinux") -> BTF:
        return cls.from_bytes(Path(path).read_bytes())

    def _index(self) -> None:
        """One pass over the type section: offset, kind, vlen, name and size/type of each."""
        data, e = self._data, self._e
        unpack = struct.Struct(e + "3I").unpack_from
        off, end = self._types_start, self._types_end
        offs, infos, names, sizes = [0], [0], [0], [0]  # id 0 is void
        extra = _EXTRA
        while off < end:
            name_off, info, size = unpack(data, off)
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            try:
                fixed, per = extra[kind]
            except KeyError:
                raise BTFError(f"unknown BTF kind {kind} at offset {off}") from None
            offs.append(off)
            infos.append(info)
            names.append(name_off)
            sizes.append(size)
            off += 12 + fixed + per * vlen
        if off != end:
            raise BTFError("type section does not end on a type boundary")
        self._offs, self._infos, self._names, self._sizes = offs, infos, names, sizes

    # -- basic accessors ------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._offs) - 1

    def _str(self, off: int) -> str:
        end = self._strs.find(b"\0", off)
        return self._strs[off : end if end >= 0 else None].decode(errors="replace")

    def kind(self, tid: int) -> int:
        return (self._infos[tid] >> 24) & 0x1F

    def _vlen(self, tid: int) -> int:
        return self._infos[tid] & 0xFFFF

    def _kflag(self, tid: int) -> bool:
        return bool(self._infos[tid] >> 31)

    def name(self, tid: int) -> str:
        return self._str(self._names[tid]) if tid else ""

    def _check(self, tid: int) -> None:
        if not 0 < tid < len(self._offs):
            raise BTFError(f"type id {tid} out of range")

    def _names_of(self, kinds: tuple[int, ...]) -> dict[str, int]:
        key = kinds[0]
        if key not in self._by_name:
            idx: dict[str, int] = {}
            for tid in range(1, len(self._offs)):
                if self.kind(tid) in kinds and self._names[tid]:
                    name = self.name(tid)
                    prev = idx.get(name)
                    if prev is None or self._better(tid, prev):
                        idx[name] = tid
            self._by_name[key] = idx
        return self._by_name[key]

    def _better(self, tid: int, prev: int) -> bool:
        return self._vlen(tid) > self._vlen(prev)

    def strip(self, tid: int) -> int:
        """Follow typedefs and qualifiers to the underlying type."""
        seen = 0
        while tid and self.kind(tid) in _MODIFIERS:
            tid = self._sizes[tid]
            seen += 1
            if seen > 64:
                raise BTFError("typedef/qualifier loop")
        return tid

    def type_size(self, tid: int) -> int:
        tid = self.strip(tid)
        k = self.kind(tid)
        if k in (KIND_INT, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_ENUM64, KIND_FLOAT,
                 KIND_DATASEC):
            return self._sizes[tid]
        if k == KIND_PTR:
            return 8
        if k == KIND_ARRAY:
            elem, _idx, n = struct.unpack_from(self._e + "3I", self._data, self._offs[tid] + 12)
            return self.type_size(elem) * n
        raise BTFError(f"type {tid} ({self.type_str(tid)}) has no size")

    # -- structs --------------------------------------------------------------------
    def members(self, tid: int) -> list[Member]:
        tid = self.strip(tid)
        if self.kind(tid) not in (KIND_STRUCT, KIND_UNION):
            raise BTFError(f"{self.type_str(tid)} is not a struct or union")
        out = []
        kflag = self._kflag(tid)
        base = self._offs[tid] + 12
        for i in range(self._vlen(tid)):
            name_off, mtype, moff = struct.unpack_from(self._e + "3I", self._data, base + 12 * i)
            if kflag:
                out.append(Member(self._str(name_off), mtype, moff & 0xFFFFFF, moff >> 24))
            else:
                out.append(Member(self._str(name_off), mtype, moff, 0))
        return out

    def struct_id(self, name: str) -> int:
        tid = self._names_of((KIND_STRUCT, KIND_UNION)).get(name)
        if tid is None:
            raise BTFError(f"no struct or union named {name!r} in BTF")
        return tid

    def has_struct(self, name: str) -> bool:
        return name in self._names_of((KIND_STRUCT, KIND_UNION))

    def struct_size(self, name: str) -> int:
        return self._sizes[self.struct_id(name)]

    def _find_member(self, tid: int, name: str) -> tuple[int, Member] | None:
        """(bit offset, member) of ``name`` in ``tid``, looking into anonymous members."""
        for m in self.members(tid):
            if m.name == name:
                return m.bit_offset, m
        for m in self.members(tid):
            if not m.name:
                sub = self.strip(m.type_id)
                if self.kind(sub) in (KIND_STRUCT, KIND_UNION):
                    found = self._find_member(sub, name)
                    if found:
                        return m.bit_offset + found[0], found[1]
        return None

    def _resolve(self, struct_name: str, path: str) -> tuple[int, Member]:
        tid = self.struct_id(struct_name)
        bits = 0
        member: Member | None = None
        for step in path.split("."):
            if member is not None:
                tid = self.strip(member.type_id)
                if self.kind(tid) not in (KIND_STRUCT, KIND_UNION):
                    raise BTFError(f"{struct_name}.{path}: {member.name} is not a struct/union")
            found = self._find_member(tid, step)
            if found is None:
                raise BTFError(f"struct {struct_name} has no member {path!r} ({step!r} missing)")
            bits += found[0]
            member = found[1]
        assert member is not None
        return bits, member

    def member_offset(self, struct: str, path: str) -> int:
        """Byte offset of a (dotted, nested) member; BTFError for a bitfield."""
        bits, m = self._resolve(struct, path)
        if m.bitfield_size or bits % 8:
            raise BTFError(f"{struct}.{path} is a bitfield (bit offset {bits})")
        return bits // 8

    def member_size(self, struct: str, path: str) -> int:
        _bits, m = self._resolve(struct, path)
        if m.bitfield_size:
            raise BTFError(f"{struct}.{path} is a bitfield of {m.bitfield_size} bits")
        return self.type_size(m.type_id)

    def has_member(self, struct: str, path: str) -> bool:
        try:
            self._resolve(struct, path)
        except BTFError:
            return False
        return True

    # -- enums ----------------------------------------------------------------------
    def _enums(self) -> dict[str, int]:
        if self._enum_values is None:
            vals: dict[str, int] = {}
            e, data = self._e, self._data
            for tid in range(1, len(self._offs)):
                k = self.kind(tid)
                if k not in (KIND_ENUM, KIND_ENUM64):
                    continue
                signed = self._kflag(tid)
                base = self._offs[tid] + 12
                for i in range(self._vlen(tid)):
                    if k == KIND_ENUM:
                        name_off, v = struct.unpack_from(e + ("Ii" if signed else "II"),
                                                         data, base + 8 * i)
                    else:
                        name_off, lo, hi = struct.unpack_from(e + "3I", data, base + 12 * i)
                        v = (hi << 32) | lo
                        if signed and v >= 1 << 63:
                            v -= 1 << 64
                    vals.setdefault(self._str(name_off), v)
            self._enum_values = vals
        return self._enum_values

    def enum_value(self, name: str) -> int:
        try:
            return self._enums()[name]
        except KeyError:
            raise BTFError(f"no enum value {name!r} in BTF") from None

    def has_enum_value(self, name: str) -> bool:
        return name in self._enums()

    # -- functions ------------------------------------------------------------------
    def has_func(self, name: str) -> bool:
        return name in self._names_of((KIND_FUNC,))

    def func_proto(self, name: str) -> FuncProto:
        fid = self._names_of((KIND_FUNC,)).get(name)
        if fid is None:
            raise BTFError(f"no function {name!r} in BTF")
        pid = self._sizes[fid]
        if self.kind(pid) != KIND_FUNC_PROTO:
            raise BTFError(f"function {name!r} has no prototype")
        args = []
        base = self._offs[pid] + 12
        for i in range(self._vlen(pid)):
            name_off, atype = struct.unpack_from(self._e + "2I", self._data, base + 8 * i)
            if atype == 0 and not name_off:
                args.append(("...", "..."))
            else:
                args.append((self._str(name_off), self.type_str(atype)))
        return FuncProto(name, args, self.type_str(self._sizes[pid]))

    def func_arg_count(self, name: str) -> int | None:
        if not self.has_func(name):
            return None
        return len(self.func_proto(name).args)

    # -- printing -------------------------------------------------------------------
    def type_str(self, tid: int, depth: int = 0) -> str:
        if tid == 0:
            return "void"
        if depth > 32:
            return "..."
        k = self.kind(tid)
        name = self.name(tid)
        if k in (KIND_INT, KIND_FLOAT, KIND_TYPEDEF):
            return name
        if k == KIND_PTR:
            return self.type_str(self._sizes[tid], depth + 1) + " *"
        if k in (KIND_STRUCT, KIND_UNION, KIND_FWD):
            tag = "union" if k == KIND_UNION or (k == KIND_FWD and self._kflag(tid)) else "struct"
            return f"{tag} {name or '(anon)'}"
        if k in (KIND_ENUM, KIND_ENUM64):
            return f"enum {name or '(anon)'}"
        if k == KIND_CONST:
            return "const " + self.type_str(self._sizes[tid], depth + 1)
        if k == KIND_VOLATILE:
            return "volatile " + self.type_str(self._sizes[tid], depth + 1)
        if k in (KIND_RESTRICT, KIND_TYPE_TAG):
            return self.type_str(self._sizes[tid], depth + 1)
        if k == KIND_ARRAY:
            elem, _idx, n = struct.unpack_from(self._e + "3I", self._data, self._offs[tid] + 12)
            return f"{self.type_str(elem, depth + 1)}[{n}]"
        if k == KIND_FUNC_PROTO:
            return "fn"
        return name or f"kind{k}"


def _elf_section(data: bytes, wanted: str) -> bytes:
    """The contents of an ELF64 section by name (enough ELF for vmlinux's .BTF)."""
    if data[4] != 2:
        raise BTFError("only ELF64 files are supported")
    e = "<" if data[5] == 1 else ">"
    shoff = struct.unpack_from(e + "Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from(e + "3H", data, 0x3A)

    def header(i: int) -> tuple[int, int, int]:
        base = shoff + i * shentsize
        name = struct.unpack_from(e + "I", data, base)[0]
        off, size = struct.unpack_from(e + "2Q", data, base + 0x18)
        return name, off, size

    _n, str_off, str_size = header(shstrndx)
    names = data[str_off : str_off + str_size]
    for i in range(shnum):
        name_off, off, size = header(i)
        end = names.find(b"\0", name_off)
        if names[name_off:end].decode(errors="replace") == wanted:
            return data[off : off + size]
    raise BTFError(f"ELF file has no {wanted} section")
