"""Structure-aware mutators for the fuzz tests: each takes a random.Random (Hypothesis's, which
it can shrink, or a seeded one for long runs) and returns the bytes of a mutated file.

- safetensors headers as JSON trees: types swapped, nesting, huge numbers, offsets shifted or
  overlapping, duplicate keys, names, metadata, and the header length and data around them;
- zip records of an ``.npz``: local headers, central directory, end record, sizes, CRCs,
  compression methods, flags, extra fields, names, offsets, data descriptors;
- ``.npy`` headers: version, length field, the dictionary's text, descr, shape, fortran_order;
- sharded-checkpoint indexes as JSON trees, their shard names and tensor names;
- HDF5 object headers: the fields of the messages of each object's header.
"""

from __future__ import annotations

import io
import json
import math
import random
import re
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path

import numpy as np


class Obj(list):
    """A JSON object as its (key, value) pairs, in order: keys may repeat."""


class Raw(str):
    """JSON text written as it is: 1e400, NaN, a number of 5,000 digits, deep nesting."""


def dumps(value: object) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, Obj):
        return "{" + ",".join(f"{json.dumps(k)}:{dumps(v)}" for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ",".join(map(dumps, value)) + "]"
    return json.dumps(value)


def loads(text: bytes) -> object:
    return json.loads(text, object_pairs_hook=Obj)


def digits(rng: random.Random) -> Raw:
    return Raw(rng.choice(["", "-"]) + "9" * rng.choice([19, 20, 21, 40, 300, 4301, 5000]))


def nested(rng: random.Random, inner: object = 1) -> Raw:
    depth = rng.choice([1, 2, 3, 4, 30, 1000, 100_000])
    opener, closer = rng.choice([("[", "]"), ('{"k":', "}")])
    return Raw(opener * depth + dumps(inner) + closer * depth)


def weird_name(rng: random.Random, others: list[str] = ()) -> str:
    return rng.choice(
        [
            "",
            "__metadata__",
            'a"b',
            "a\\b",
            "\x00",
            "\n",
            "\u2028",
            "\U0001f600",
            "\udcff",
            "é",
            "x" * rng.choice([200, 70_000]),
            "a/b/c",
            "a.b",
            *others,
        ]
    )


def random_value(rng: random.Random) -> object:
    """Any JSON value, often of the wrong type or size for where it is put."""
    return rng.choice(
        [
            lambda: None,
            lambda: rng.choice([True, False]),
            lambda: rng.choice([0, 1, -1, 4, 2**31, 2**63 - 1, 2**63, 2**64 - 1, 2**64]),
            lambda: rng.choice([0.5, 4.0, -0.0, 1e300]),
            lambda: Raw(rng.choice(["1e400", "-1e400", "NaN", "Infinity", "-Infinity", "1E2"])),
            lambda: digits(rng),
            lambda: Raw("1." + "0" * rng.choice([10, 30])),
            lambda: rng.choice(["", "F32", "F16", "BF16", "F8_E4M3", "f32", "Q7", "I32"]),
            lambda: "x" * rng.choice([1, 100, 70_000]),
            lambda: rng.choice([[], [1], [0, 4], [[1]], [0, 4, 8], ["0", "4"], [-1]]),
            lambda: Obj(rng.choice([[], [("dtype", "F32")], [("a", 1), ("a", 2)]])),
            lambda: nested(rng),
        ]
    )()


# -- safetensors -----------------------------------------------------------------------------

SAFETENSORS_BITS = {
    "F64": 64, "F32": 32, "F16": 16, "BF16": 16, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8, "F8_E8M0": 8, "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4, "I8": 8, "I16": 16,
    "I32": 32, "I64": 64, "U8": 8, "U16": 16, "U32": 32, "U64": 64, "BOOL": 8, "C64": 64,
}  # fmt: skip
# Types the reference library reads too, by size: a swap among them keeps a file valid.
SAME_SIZE = {
    64: ["F64", "I64", "U64"],
    32: ["F32", "I32", "U32"],
    16: ["F16", "BF16", "I16", "U16"],
    8: ["F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL"],
}


@dataclass
class Safetensors:
    header: Obj
    data: bytearray
    length_delta: int = 0
    padding: int = 0

    @classmethod
    def parse(cls, seed: bytes) -> Safetensors:
        n = int.from_bytes(seed[:8], "little")
        return cls(loads(seed[8 : 8 + n]), bytearray(seed[8 + n :]))

    def entries(self) -> list[tuple[int, str, Obj]]:
        return [
            (i, k, v)
            for i, (k, v) in enumerate(self.header)
            if isinstance(v, Obj) and k != "__metadata__"
        ]

    def to_bytes(self) -> bytes:
        text = dumps(self.header).encode("utf-8", "surrogatepass") + b" " * self.padding
        length = min(max(len(text) + self.length_delta, 0), 2**64 - 1)
        return struct.pack("<Q", length) + text + bytes(self.data)


def _entry(st: Safetensors, rng: random.Random) -> Obj | None:
    entries = st.entries()
    return rng.choice(entries)[2] if entries else None


def _set(obj: Obj, key: str, value: object) -> None:
    for i, (k, _) in enumerate(obj):
        if k == key:
            obj[i] = (k, value)
            return
    obj.append((key, value))


def _get(obj: Obj, key: str) -> object:
    return next((v for k, v in obj if k == key), None)


def _nodes(tree: object) -> list[tuple[list, int]]:
    """(container, index) of every value inside *tree* (an Obj's pairs are replaced whole)."""
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (Obj, list)) and not isinstance(node, Raw):
            for i, item in enumerate(node):
                found.append((node, i))
                stack.append(item[1] if isinstance(node, Obj) else item)
    return found


def _replace_node(tree: object, rng: random.Random, make: Callable[[object], object]) -> None:
    nodes = _nodes(tree)
    if nodes:
        parent, i = rng.choice(nodes)
        if isinstance(parent, Obj):
            parent[i] = (parent[i][0], make(parent[i][1]))
        else:
            parent[i] = make(parent[i])


def st_retype_any(st, rng):
    _replace_node(st.header, rng, lambda _: random_value(rng))


def st_retype_field(st, rng):
    entry = _entry(st, rng)
    if entry is not None:
        _set(entry, rng.choice(["dtype", "shape", "data_offsets"]), random_value(rng))


def st_same_size_dtype(st, rng):
    entry = _entry(st, rng)
    code = _get(entry, "dtype") if entry is not None else None
    bits = SAFETENSORS_BITS.get(code) if isinstance(code, str) else None
    if bits in SAME_SIZE:
        _set(entry, "dtype", rng.choice(SAME_SIZE[bits]))


def st_any_dtype(st, rng):
    entry = _entry(st, rng)
    if entry is not None:
        _set(entry, "dtype", rng.choice([*SAFETENSORS_BITS, "Q7", "f32", "F32 "]))


def st_reshape(st, rng):
    entry = _entry(st, rng)
    shape = _get(entry, "shape") if entry is not None else None
    if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
        return
    numel = math.prod(shape)
    choices = [
        [numel],
        [1, numel],
        [numel, 1, 1],
        [*shape, 0],
        [d + 1 for d in shape],
        [max(d - 1, 0) for d in shape],
        [1] * rng.choice([64, 65, 1000]) + [numel],
        [-numel],
        [2**32, 2**32, 2**32],
        [2**62, 0],
    ]
    _set(entry, "shape", rng.choice(choices))


def st_shift_offsets(st, rng):
    entry = _entry(st, rng)
    offsets = _get(entry, "data_offsets") if entry is not None else None
    if not isinstance(offsets, list) or len(offsets) != 2:
        return
    begin, end = offsets
    if not (isinstance(begin, int) and isinstance(end, int)):
        return
    delta = rng.choice([1, -1, 2, 4, -4, 8, end - begin, 2**32, 2**63])
    kind = rng.randrange(4)
    new = [
        [begin + delta, end + delta],
        [begin, end + delta],
        [begin + delta, end],
        [end, begin],
    ][kind]
    _set(entry, "data_offsets", new)


def st_overlap(st, rng):
    """Make a tensor's data the same as, or overlapping, another's."""
    entries = st.entries()
    if len(entries) < 2:
        return
    (_, _, a), (_, _, b) = rng.sample(entries, 2)
    offsets_b = _get(b, "data_offsets")
    if isinstance(offsets_b, list):
        _set(a, "data_offsets", list(offsets_b))
        _set(a, "shape", _get(b, "shape"))
        _set(a, "dtype", _get(b, "dtype"))


def st_duplicate_key(st, rng):
    if st.header:
        pair = rng.choice(st.header)
        other = rng.choice(st.header)
        st.header.insert(rng.randrange(len(st.header) + 1), (pair[0], rng.choice([pair, other])[1]))


def st_rename(st, rng):
    entries = st.entries()
    if entries:
        i, _, value = rng.choice(entries)
        st.header[i] = (weird_name(rng, [n for _, n, _ in entries]), value)


def st_nest(st, rng):
    _replace_node(st.header, rng, lambda value: nested(rng, value))


def st_huge_number(st, rng):
    _replace_node(st.header, rng, lambda value: digits(rng) if isinstance(value, int) else value)


def st_metadata(st, rng):
    metadata = rng.choice(
        [
            Obj([("step", "12"), ("format", "pt")]),
            Obj([("global_step", str(rng.choice([0, 7, 2**70])))]),
            Obj([("step", 12)]),
            Obj([("a", "x"), ("a", "y")]),
            Obj([("n", nested(rng, "x"))]),
            Obj([("n", digits(rng))]),
            random_value(rng),
        ]
    )
    st.header.insert(rng.randrange(len(st.header) + 1), ("__metadata__", metadata))


def st_remove(st, rng):
    entry = _entry(st, rng)
    if entry is not None and rng.random() < 0.5 and entry:
        del entry[rng.randrange(len(entry))]
    elif st.header:
        del st.header[rng.randrange(len(st.header))]


def st_extra_field(st, rng):
    entry = _entry(st, rng)
    if entry is not None:
        entry.append((rng.choice(["x", "dtype", "offsets", ""]), random_value(rng)))


def st_reorder(st, rng):
    rng.shuffle(st.header)


def st_not_an_object(st, rng):
    st.header = rng.choice([[], [1], Raw('"text"'), Raw("null"), Raw("1"), nested(rng, [])])


def st_frame(st, rng):
    """The header length field, the padding, the data buffer's length and its values."""
    kind = rng.randrange(4)
    if kind == 0:
        st.length_delta = rng.choice([-1, 1, -8, 8, 2**20, 2**40, 2**64])
    elif kind == 1:
        st.padding = rng.choice([1, 7, 8, 100])
    elif kind == 2 and rng.random() < 0.5:
        st.data.extend(bytes(rng.randint(1, 16)))
    elif kind == 2:
        del st.data[rng.randrange(len(st.data) + 1) :]
    elif st.data:
        position = rng.randrange(len(st.data))
        st.data[position] = rng.choice([0x7F, 0xFF, 0x80, 0x00])  # NaN/Inf bytes, sign bits


SAFETENSORS_MUTATIONS = [
    st_retype_any, st_retype_field, st_same_size_dtype, st_any_dtype, st_reshape,
    st_shift_offsets, st_overlap, st_duplicate_key, st_rename, st_nest, st_huge_number,
    st_metadata, st_remove, st_extra_field, st_reorder, st_not_an_object, st_frame,
]  # fmt: skip


def mutate_safetensors(seed: bytes, rng: random.Random) -> bytes:
    st = Safetensors.parse(seed)
    for _ in range(rng.choice([1, 1, 2, 3])):
        if isinstance(st.header, Obj):
            rng.choice(SAFETENSORS_MUTATIONS)(st, rng)
    return st.to_bytes()


# -- zip records (npz) -----------------------------------------------------------------------

LOCAL = struct.Struct("<4sHHHHHIIIHH")  # signature, version, flags, method, time, date, crc,
#                                         compressed size, size, name length, extra length
CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")  # + made by, comment length, disk, attributes,
#                                                 external attributes, local header offset
END = struct.Struct("<4sHHHHIIH")  # disk, disk of directory, entries here, entries, size,
#                                    offset, comment length
LOCAL_FIELDS = [
    "signature",
    "version",
    "flags",
    "method",
    "time",
    "date",
    "crc",
    "csize",
    "usize",
    "nlen",
    "xlen",
]
CENTRAL_FIELDS = [
    "signature",
    "made",
    "version",
    "flags",
    "method",
    "time",
    "date",
    "crc",
    "csize",
    "usize",
    "nlen",
    "xlen",
    "clen",
    "disk",
    "iattr",
    "eattr",
    "offset",
]
END_FIELDS = ["signature", "disk", "cddisk", "here", "entries", "size", "offset", "clen"]


@dataclass
class ZipMember:
    name: bytes
    method: int
    flags: int
    crc: int
    csize: int
    usize: int
    data: bytes
    time: int = 0
    date: int = 0x21
    eattr: int = 0
    local_name: bytes | None = None  # when the local header names it otherwise
    local_extra: bytes = b""
    central_extra: bytes = b""
    comment: bytes = b""
    descriptor: bytes = b""
    local_pins: dict[str, int] = field(default_factory=dict)
    central_pins: dict[str, int] = field(default_factory=dict)


@dataclass
class ZipArchive:
    members: list[ZipMember]
    central_order: list[int] | None = None  # which member each central entry describes
    comment: bytes = b""
    prefix: bytes = b""
    suffix: bytes = b""
    end_pins: dict[str, int] = field(default_factory=dict)
    zip64_end: bytes = b""  # raw zip64 end record and locator, before the end record

    @classmethod
    def parse(cls, seed: bytes) -> ZipArchive:
        members = []
        with zipfile.ZipFile(io.BytesIO(seed)) as archive:
            for info in archive.infolist():
                local = dict(
                    zip(LOCAL_FIELDS, LOCAL.unpack_from(seed, info.header_offset), strict=True)
                )
                start = info.header_offset + LOCAL.size + local["nlen"] + local["xlen"]
                members.append(
                    ZipMember(
                        name=info.orig_filename.encode(),
                        method=info.compress_type,
                        flags=info.flag_bits,
                        crc=info.CRC,
                        csize=info.compress_size,
                        usize=info.file_size,
                        data=seed[start : start + info.compress_size],
                        time=local["time"],
                        date=local["date"],
                        eattr=info.external_attr,
                        local_extra=seed[start - local["xlen"] : start],
                        central_extra=info.extra,
                    )
                )
        return cls(members)

    def to_bytes(self) -> bytes:
        out = bytearray(self.prefix)
        offsets = []
        for m in self.members:
            offsets.append(len(out))
            name = m.name if m.local_name is None else m.local_name
            values = {
                "signature": b"PK\x03\x04", "version": 20, "flags": m.flags, "method": m.method,
                "time": m.time, "date": m.date, "crc": m.crc, "csize": m.csize, "usize": m.usize,
                "nlen": len(name), "xlen": len(m.local_extra),
            } | m.local_pins  # fmt: skip
            out += _pack(LOCAL, LOCAL_FIELDS, values) + name + m.local_extra + m.data
            out += m.descriptor
        start = len(out)
        order = range(len(self.members)) if self.central_order is None else self.central_order
        for i in order:
            m = self.members[i]
            values = {
                "signature": b"PK\x01\x02", "made": 20, "version": 20, "flags": m.flags,
                "method": m.method, "time": m.time, "date": m.date, "crc": m.crc,
                "csize": m.csize, "usize": m.usize, "nlen": len(m.name),
                "xlen": len(m.central_extra), "clen": len(m.comment), "disk": 0, "iattr": 0,
                "eattr": m.eattr, "offset": offsets[i],
            } | m.central_pins  # fmt: skip
            out += _pack(CENTRAL, CENTRAL_FIELDS, values) + m.name + m.central_extra + m.comment
        size = len(out) - start
        out += self.zip64_end
        values = {
            "signature": b"PK\x05\x06", "disk": 0, "cddisk": 0, "here": len(order),
            "entries": len(order), "size": size, "offset": start, "clen": len(self.comment),
        } | self.end_pins  # fmt: skip
        return bytes(out + _pack(END, END_FIELDS, values) + self.comment + self.suffix)


def _pack(layout: struct.Struct, names: list[str], values: dict[str, object]) -> bytes:
    fields = []
    for name, code in zip(names, re.findall(r"\d*[a-zA-Z]", layout.format[1:]), strict=True):
        value = values[name]
        if not code.endswith("s"):
            value = int(value) % (1 << (8 * struct.calcsize(code)))  # wrap, as a damaged field
        fields.append(value)
    return layout.pack(*fields)


def _field_value(rng: random.Random, current: int) -> int:
    return rng.choice([0, 1, current + 1, current - 1, current * 2, 0xFFFF, 0xFFFFFFFF, 2**31])


def zip_pin_field(z, rng):
    member = rng.choice(z.members)
    kind = rng.randrange(3)
    if kind == 0:
        name = rng.choice(LOCAL_FIELDS[1:])
        member.local_pins[name] = _field_value(rng, getattr(member, name, 0))
    elif kind == 1:
        name = rng.choice(CENTRAL_FIELDS[1:])
        member.central_pins[name] = _field_value(rng, getattr(member, name, 0))
    else:
        name = rng.choice(END_FIELDS[1:])
        z.end_pins[name] = _field_value(rng, len(z.members))


def zip_signature(z, rng):
    member = rng.choice(z.members)
    bad = rng.choice([b"PK\x03\x03", b"PK\x01\x02", b"\0\0\0\0", b"PK\x05\x06"])
    if rng.random() < 0.5:
        member.local_pins["signature"] = bad
    else:
        member.central_pins["signature"] = bad


def zip_method(z, rng):
    """A compression method other than the data's, in one header or both."""
    member = rng.choice(z.members)
    method = rng.choice([0, 8, 12, 14, 9, 1, 99, 93])
    where = rng.randrange(3)
    if where in (0, 2):
        member.local_pins["method"] = method
    if where in (1, 2):
        member.central_pins["method"] = method
    if where == 2 and rng.random() < 0.5:
        member.method = method


def zip_flags(z, rng):
    member = rng.choice(z.members)
    bit = rng.choice([0x1, 0x8, 0x40, 0x800, 0x2000, 0x4])
    if rng.random() < 0.5:
        member.flags ^= bit
    else:
        (member.local_pins if rng.random() < 0.5 else member.central_pins)["flags"] = bit


def zip_descriptor(z, rng):
    """Sizes and CRC after the data (flag bit 3), as streaming writers do: valid or not."""
    member = rng.choice(z.members)
    member.flags |= 0x8
    member.local_pins.update(crc=0, csize=0, usize=0)
    crc = member.crc + rng.choice([0, 0, 0, 1])
    signature = b"PK\x07\x08" if rng.random() < 0.7 else b""
    member.descriptor = signature + struct.pack("<III", crc, member.csize, member.usize)


def zip_crc(z, rng):
    member = rng.choice(z.members)
    where = rng.randrange(3)
    if where == 0:
        member.local_pins["crc"] = member.crc ^ 1
    elif where == 1:
        member.central_pins["crc"] = member.crc ^ 1
    else:
        member.crc ^= 1 << rng.randrange(32)


def zip_sizes(z, rng):
    member = rng.choice(z.members)
    name = rng.choice(["csize", "usize"])
    value = rng.choice(
        [0, 1, getattr(member, name) - 1, getattr(member, name) + 1, 0xFFFFFFFF, 1 << 30]
    )
    where = rng.randrange(3)
    if where in (0, 2):
        member.local_pins[name] = value
    if where in (1, 2):
        member.central_pins[name] = value


def zip_extra(z, rng):
    """Extra fields: zip64 with too few or too many bytes, unknown, truncated."""
    member = rng.choice(z.members)
    size = rng.choice([0, 3, 8, 16, 24, 28, 32])
    body = rng.choice(
        [
            struct.pack("<QQQI", member.usize, member.csize, 0, 0)[:size],
            bytes(size),
            b"\xff" * size,
        ]
    )
    extra = rng.choice(
        [
            struct.pack("<HH", 0x0001, len(body)) + body,
            struct.pack("<HH", 0x0001, len(body) + 8) + body,  # says more than it has
            struct.pack("<HH", 0x7075, 5) + b"\x01\0\0\0\0",
            struct.pack("<HH", 0xCAFE, 2) + b"ab",
            b"\x01",
            bytes(rng.randrange(256) for _ in range(rng.randint(1, 12))),
        ]
    )
    if rng.random() < 0.5:
        member.local_extra += extra
    else:
        member.central_extra += extra
    if rng.random() < 0.3:
        member.csize = member.usize = 0xFFFFFFFF  # zip64: the sizes are in the extra field


def zip_name(z, rng):
    member = rng.choice(z.members)
    others = [m.name for m in z.members if m is not member]
    name = rng.choice(
        [
            *others,
            member.name.upper(),
            b"../" + member.name,
            b"/" + member.name,
            b"dir/",
            b"",
            b"a\0.npy",
            b"\xff\xfe.npy",
            b"x" * 60_000 + b".npy",
            member.name + b".npy",
            member.name.replace(b".npy", b""),
            b"data.pkl",
            b"a/data.pkl",
        ]
    )
    where = rng.randrange(3)
    if where == 0:
        member.local_name = name
    elif where == 1:
        member.local_name = member.name
        member.name = name
    else:
        member.name = name
    if rng.random() < 0.2:
        member.flags |= 0x800  # names are UTF-8


def zip_offset(z, rng):
    member = rng.choice(z.members)
    member.central_pins["offset"] = rng.choice(
        [0, 1, 0xFFFFFFFF, 1 << 20, len(z.prefix) + rng.randrange(64)]
    )


def zip_members(z, rng):
    """Members duplicated, left out of the directory, reordered, or the directory in another
    order than the data."""
    kind = rng.randrange(4)
    count = len(z.members)
    if kind == 0:
        z.central_order = [*range(count), rng.randrange(count)]  # one described twice
    elif kind == 1:
        z.central_order = [i for i in range(count) if i != rng.randrange(count)]
    elif kind == 2:
        z.central_order = list(reversed(range(count)))
    else:
        copy = replace(rng.choice(z.members), local_pins={}, central_pins={})
        z.members.insert(rng.randrange(count + 1), copy)


def zip_frame(z, rng):
    """Bytes before the archive (a self-extractor's stub), after it, a comment, a zip64 end."""
    kind = rng.randrange(4)
    if kind == 0:
        z.prefix = bytes(rng.choice([1, 100, 4096]))
    elif kind == 1:
        z.suffix = rng.choice([b"\0", b"PK\x05\x06", bytes(70_000)])
    elif kind == 2:
        z.comment = rng.choice([b"c", b"PK\x05\x06" + bytes(18), b"x" * 65_535])
    else:
        record = struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, 1, 1, 1, 0)
        locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, rng.choice([0, 1 << 40]), 1)
        z.zip64_end = record + locator
        z.end_pins["offset"] = 0xFFFFFFFF


def zip_data(z, rng):
    member = rng.choice(z.members)
    data = bytearray(member.data)
    kind = rng.randrange(3)
    if kind == 0 and data:
        del data[rng.randrange(len(data)) :]
    elif kind == 1 and data:
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    else:
        data = bytearray(rng.randrange(256) for _ in range(rng.randint(0, 64)))
    member.data = bytes(data)
    if rng.random() < 0.5:  # sizes and CRC that agree with the damaged data
        member.csize = len(data)


ZIP_MUTATIONS = [
    zip_pin_field, zip_signature, zip_method, zip_flags, zip_descriptor, zip_crc, zip_sizes,
    zip_extra, zip_name, zip_offset, zip_members, zip_frame, zip_data,
]  # fmt: skip


@cache
def npz_seed() -> bytes:
    """An .npz with members of every compression method zipfile writes, and a non-array."""
    rng = np.random.default_rng(5)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, method, array in [
            ("w.npy", zipfile.ZIP_STORED, rng.standard_normal((6, 5)).astype(np.float32)),
            ("b.npy", zipfile.ZIP_STORED, rng.standard_normal(5).astype(">f2")),
            ("d.npy", zipfile.ZIP_DEFLATED, rng.standard_normal(40)),
            ("z.npy", zipfile.ZIP_BZIP2, rng.standard_normal(7).astype(np.float32)),
            ("l.npy", zipfile.ZIP_LZMA, np.asfortranarray(rng.standard_normal((3, 2)))),
            ("n.npy", zipfile.ZIP_STORED, np.arange(3, dtype=np.int32)),
        ]:
            member = io.BytesIO()
            np.save(member, array)
            z.writestr(zipfile.ZipInfo(name, (2024, 1, 1, 0, 0, 0)), member.getvalue(), method)
        z.writestr("notes.txt", b"hello", zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


def mutate_zip(seed: bytes, rng: random.Random) -> bytes:
    archive = ZipArchive.parse(seed)
    for _ in range(rng.choice([1, 1, 2, 3])):
        rng.choice(ZIP_MUTATIONS)(archive, rng)
    return archive.to_bytes()


# -- .npy headers ----------------------------------------------------------------------------

DESCRS = [
    "'<f4'", "'<f8'", "'>f8'", "'<f2'", "'|V2'", "'|V1'", "'|u1'", "'<i4'", "'|b1'", "'<c8'",
    "'O'", "'|O'", "'<U3'", "'<M8[s]'", "'<f16'", "'|V0'", "'|V4'", "'xyz'", "5", "None", "[]",
    "[('x', '<f4'), ('n', '<i4')]", "[('x', 'O')]", "('<f4', (2,))", "'<f4", "'<f4'*3", "{}",
]  # fmt: skip
SHAPES = [
    "(n,)", "()", "(0,)", "(-1,)", "(2, 3)", "(n, 1)", "(1, n)", "(99999999999999999,)",
    "(2**63,)", "(9223372036854775807,)", "(1,) * 70", "(" + "1, " * 65 + ")", "(2.0,)", "'3'",
    "[n]", "(nL,)", "((n,),)", "(n, -1)", "(-2, -2)", "(True,)", "(n,", "None",
]  # fmt: skip


def npy_member(rng: random.Random) -> bytes:
    """A .npy member whose header (version, length, text) is mutated."""
    values = np.random.default_rng(rng.randrange(1 << 30)).standard_normal(rng.choice([0, 1, 6]))
    n = len(values)
    descr = rng.choice(DESCRS) if rng.random() < 0.4 else "'<f8'"
    shape = rng.choice(SHAPES).replace("n", str(n)) if rng.random() < 0.4 else f"({n},)"
    fortran = rng.choice(["False", "True", "1", "None", "'no'"]) if rng.random() < 0.2 else "False"
    items = [f"'descr': {descr}", f"'fortran_order': {fortran}", f"'shape': {shape}"]
    kind = rng.randrange(8)
    if kind == 0:
        del items[rng.randrange(3)]
    elif kind == 1:
        items.append(rng.choice(["'extra': 1", "'descr': '<f4'", "'shape': ()"]))
    elif kind == 2:
        rng.shuffle(items)
    text = "{" + ", ".join(items) + rng.choice([", }", "}", ", "]) if kind != 3 else "{" + "(" * 300
    if kind == 4:
        text += rng.choice([" '''", " '", " #", "\x00", " é", "\n\n", " " * 12_000])
    version = rng.choice([(1, 0), (2, 0), (3, 0)] * 10 + [(0, 0), (4, 0), (1, 1), (255, 255)])
    header = text.encode("utf-8" if version == (3, 0) else "latin-1", "replace")
    length_format = "<H" if version[0] == 1 else "<I"
    header += b" " * (-(10 + len(header) + 1) % 64) + b"\n"
    length = len(header)
    if rng.random() < 0.1:
        length = rng.choice([0, length - 1, length + 1, 0xFFFF, 0xFFFFFFFF])
    length_bytes = struct.pack(length_format, length % (1 << (8 * struct.calcsize(length_format))))
    data = values.tobytes()
    if rng.random() < 0.1:
        data = data[: rng.randrange(len(data) + 1)] + bytes(rng.choice([0, 1, 8]))
    return b"\x93NUMPY" + bytes(version) + length_bytes + header + data


def mutate_npy(rng: random.Random) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("a.npy", npy_member(rng), rng.choice([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
        good = io.BytesIO()
        np.save(good, np.array([3.0, 4.0], np.float32))
        z.writestr("b.npy", good.getvalue())
    return buffer.getvalue()


# -- indexes ---------------------------------------------------------------------------------

SHARD_NAMES = ["s1.safetensors", "s2.safetensors"]


def index_tree() -> Obj:
    return Obj(
        [
            ("metadata", Obj([("total_size", 236)])),
            (
                "weight_map",
                Obj([("w", SHARD_NAMES[0]), ("b", SHARD_NAMES[0]), ("d", SHARD_NAMES[1])]),
            ),
        ]
    )


def ix_shard(tree, rng):
    weight_map = _get(tree, "weight_map")
    if isinstance(weight_map, Obj) and weight_map:
        i = rng.randrange(len(weight_map))
        shard = rng.choice(
            [
                *SHARD_NAMES,
                "missing.safetensors",
                "notes.txt",
                "sub",
                "model.safetensors.index.json",
                "",
                ".",
                "sub/../s1.safetensors",
                random_value(rng),
            ]
        )
        weight_map[i] = (weight_map[i][0], shard)


def ix_tensor(tree, rng):
    weight_map = _get(tree, "weight_map")
    if not isinstance(weight_map, Obj):
        return
    kind = rng.randrange(3)
    if kind == 0 and weight_map:
        del weight_map[rng.randrange(len(weight_map))]
    elif kind == 1:
        weight_map.append((rng.choice(["n", "x", "w"]), rng.choice(SHARD_NAMES)))
    elif weight_map:
        i = rng.randrange(len(weight_map))
        weight_map[i] = (weird_name(rng, ["w", "b", "d", "n"]), weight_map[i][1])


def ix_tree(tree, rng):
    _replace_node(tree, rng, lambda value: rng.choice([random_value(rng), nested(rng, value)]))


def ix_duplicate(tree, rng):
    target = rng.choice([tree, _get(tree, "weight_map")])
    if isinstance(target, Obj) and target:
        target.append(rng.choice(target))


INDEX_MUTATIONS = [ix_shard, ix_shard, ix_tensor, ix_tensor, ix_tree, ix_duplicate]


def mutate_index(rng: random.Random) -> bytes:
    tree = index_tree()
    for _ in range(rng.choice([1, 1, 2, 3])):
        rng.choice(INDEX_MUTATIONS)(tree, rng)
    if rng.random() < 0.05:
        tree = rng.choice([Obj(), [tree], Raw("null")])
    return dumps(tree).encode("utf-8", "surrogatepass")


def write_index_case(folder: Path, shards: dict[str, bytes], index: bytes) -> Path:
    """The shards, a non-tensor file, a sub-folder and the index, in *folder*."""
    for name, data in shards.items():
        (folder / name).write_bytes(data)
    (folder / "notes.txt").write_text("not a tensor file")
    (folder / "sub").mkdir(exist_ok=True)
    path = folder / "model.safetensors.index.json"
    path.write_bytes(index)
    return path


# -- HDF5 object headers ---------------------------------------------------------------------

H5_MESSAGE = struct.Struct("<HHB3x")  # type, size, flags (version 1 object headers)


def h5_object_headers(data: bytes, addresses: list[int]) -> list[tuple[int, int]]:
    """(offset, length) of the messages of the version 1 object headers at *addresses*."""
    found = []
    for address in addresses:
        if address + 16 > len(data) or data[address] != 1:
            continue
        count, _, size = struct.unpack_from("<HII", data, address + 2)
        position, end = address + 16, min(address + 16 + size, len(data))
        for _ in range(count):
            if position + 8 > end:
                break
            _, length, _ = H5_MESSAGE.unpack_from(data, position)
            found.append((position, 8 + length))
            position += 8 + length
    return found


def mutate_h5_object_header(seed: bytes, messages: list[tuple[int, int]], rng) -> bytes:
    """One message of an object header changed: its type, size, flags or a field of its body."""
    out = bytearray(seed)
    for _ in range(rng.choice([1, 1, 2])):
        position, length = rng.choice(messages)
        kind = rng.randrange(5)
        if kind == 0:
            out[position : position + 2] = struct.pack(
                "<H", rng.choice([0, 1, 3, 5, 8, 11, 12, 16, 0x18, 0xFF])
            )
        elif kind == 1:
            size = rng.choice([0, 1, length - 9, length - 7, 0xFFFF])
            out[position + 2 : position + 4] = struct.pack("<H", max(size, 0) & 0xFFFF)
        elif kind == 2:
            out[position + 4] = rng.choice([0x1, 0x2, 0x8, 0x80, 0xFF])
        elif length > 8:
            at = position + 8 + rng.randrange(length - 8)
            width = rng.choice([1, 2, 4, 8])
            value = rng.choice([0, 1, 0xFF, 2**63, 2**64 - 1, rng.getrandbits(64)])
            out[at : at + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
    return bytes(out)
