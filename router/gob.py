"""Go `encoding/gob`, as much of it as Weave Net puts on the wire.

Schemas describe Go types (`StructType`, `SliceType`, `MapType`, `ArrayType` and the
built-ins); values are plain Python data. An `Encoder` is one gob stream: it sends each
type's definition the first time a value needs it, numbering types the way a Go process
would (a struct before its fields, a slice or map after its element). A `Decoder` reads
one stream and keeps the definitions it meets; it never trusts a length, count or id
from the input, and raises only `GobError`.

Decoded structs are `GobStruct`s. Absent map fields decode as None (Go's nil map) and
absent `Field(optional=True)` structs (Go pointers) as None, so that re-encoding what was
decoded gives Go's bytes.
"""

from __future__ import annotations

import struct as _struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from struct import error as struct_error
from typing import Any

from router.errors import GobError, GobLimitError

__all__ = [
    "BOOL", "INT", "UINT", "FLOAT", "BYTES", "STRING", "COMPLEX",
    "Builtin", "SliceType", "ArrayType", "MapType", "StructType", "Field", "GobType", "GobStruct",
    "STRING_MAP", "Encoder", "Decoder", "encode", "encode_stream", "decode_all",
    "encode_uint", "decode_uint", "encode_int", "decode_int", "GobError", "GobLimitError", "WireDef",
    "MAX_TYPES", "MAX_DEFINITION_BYTES", "MAX_ITEMS",
]

_MAX_UINT = (1 << 64) - 1
_MIN_INT = -(1 << 63)
_MAX_INT = (1 << 63) - 1
_FIRST_USER_ID = 64
# Nesting deeper than this is not something Weave sends; refusing it keeps a hostile
# stream from exhausting the Python stack.
_MAX_DEPTH = 64
# What one stream's decoder keeps, at most. Weave's busiest streams (topology, IPAM and
# DNS gossip) define under ten types in well under 1 KiB, so these bounds are only ever
# reached by a hostile or broken peer. They also bound the memory a stream can pin: a
# definition costs some 20 bytes of Python objects per wire byte (a 3-byte struct field
# becomes a tuple), so 64 KiB of definitions pins under 2 MB.
MAX_TYPES = 1024
MAX_DEFINITION_BYTES = 64 * 1024
# Objects one decoded value may make: an element of a slice, array or map counts one,
# a struct one plus one per field it ends up with (absent fields are filled with
# zeros). A struct costs one byte on the wire but hundreds in memory, so without this
# a 10 MiB message of empty structs became gigabytes. Real values (a whole cluster's
# DNS entries or IPAM ring) stay well under it.
MAX_ITEMS = 1 << 20


# ---------------------------------------------------------------- schemas


def _cached_hash(self: Any) -> int:
    # Schemas are nested frozen dataclasses used as dict keys on hot paths; hashing them
    # recursively every time costs more than the encoding itself.
    h = self.__dict__.get("_hash")
    if h is None:
        h = hash((type(self).__name__, *(getattr(self, n) for n in self.__dataclass_fields__)))
        object.__setattr__(self, "_hash", h)
    return h


@dataclass(frozen=True)
class Builtin:
    id: int
    name: str

    def __repr__(self) -> str:
        return self.name.upper()


BOOL = Builtin(1, "bool")
INT = Builtin(2, "int")
UINT = Builtin(3, "uint")
FLOAT = Builtin(4, "float")
BYTES = Builtin(5, "[]byte")
STRING = Builtin(6, "string")
COMPLEX = Builtin(7, "complex")
_BUILTINS = {b.id: b for b in (BOOL, INT, UINT, FLOAT, BYTES, STRING, COMPLEX)}
_INTERFACE_ID = 8


@dataclass(frozen=True)
class SliceType:
    __hash__ = _cached_hash
    elem: GobType
    name: str = ""


@dataclass(frozen=True)
class ArrayType:
    __hash__ = _cached_hash
    elem: GobType
    length: int
    name: str = ""


@dataclass(frozen=True)
class MapType:
    __hash__ = _cached_hash
    key: GobType
    elem: GobType
    name: str = ""


@dataclass(frozen=True)
class Field:
    __hash__ = _cached_hash
    name: str
    type: GobType
    # A Go pointer to a struct: None (nil) is omitted instead of sent as a zero struct.
    optional: bool = False


@dataclass(frozen=True)
class StructType:
    __hash__ = _cached_hash
    name: str
    fields: tuple[Field, ...] = field(default_factory=tuple)

    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)


GobType = Builtin | SliceType | ArrayType | MapType | StructType

STRING_MAP = MapType(STRING, STRING)


class GobStruct(Mapping[str, Any]):
    """A decoded struct value: a read-only, hashable mapping of field name to value."""

    __slots__ = ("_name", "_fields", "_hash")

    def __init__(self, name: str, fields: dict[str, Any]) -> None:
        self._name = name
        self._fields = fields
        self._hash: int | None = None

    @property
    def type_name(self) -> str:
        return self._name

    def __getitem__(self, key: str) -> Any:
        return self._fields[key]

    def __getattr__(self, key: str) -> Any:
        try:
            return self._fields[key]
        except KeyError:
            raise AttributeError(key) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(tuple((k, _hashable(v)) for k, v in self._fields.items()))
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return dict(self._fields) == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self._fields.items())
        return f"{self._name or 'struct'}({inner})"


def _hashable(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple((_hashable(k), _hashable(v)) for k, v in value.items())
    return value


# ------------------------------------------------------ the definition types
# Go predefines the types that describe types (ids 16-23). Expressing them as ordinary
# schemas lets one struct codec encode and decode definitions as well as values.

_COMMON_TYPE = StructType("CommonType", (Field("Name", STRING), Field("Id", INT)))
_ARRAY_TYPE = StructType(
    "arrayType", (Field("CommonType", _COMMON_TYPE), Field("Elem", INT), Field("Len", INT))
)
_SLICE_TYPE = StructType("sliceType", (Field("CommonType", _COMMON_TYPE), Field("Elem", INT)))
_FIELD_TYPE = StructType("fieldType", (Field("Name", STRING), Field("Id", INT)))
_FIELD_SLICE = SliceType(_FIELD_TYPE)
_STRUCT_TYPE = StructType("structType", (Field("CommonType", _COMMON_TYPE), Field("Field", _FIELD_SLICE)))
_MAP_TYPE = StructType(
    "mapType", (Field("CommonType", _COMMON_TYPE), Field("Key", INT), Field("Elem", INT))
)
_GOB_ENCODER_TYPE = StructType("gobEncoderType", (Field("CommonType", _COMMON_TYPE),))
_WIRE_TYPE = StructType(
    "wireType",
    (
        Field("ArrayT", _ARRAY_TYPE, optional=True),
        Field("SliceT", _SLICE_TYPE, optional=True),
        Field("StructT", _STRUCT_TYPE, optional=True),
        Field("MapT", _MAP_TYPE, optional=True),
        Field("GobEncoderT", _GOB_ENCODER_TYPE, optional=True),
        Field("BinaryMarshalerT", _GOB_ENCODER_TYPE, optional=True),
        Field("TextMarshalerT", _GOB_ENCODER_TYPE, optional=True),
    ),
)
# gobEncoderType's id is internal to Go (never referenced on the wire); 24 is ours.
_PREDEFINED: dict[GobType, int] = {
    _WIRE_TYPE: 16,
    _ARRAY_TYPE: 17,
    _COMMON_TYPE: 18,
    _SLICE_TYPE: 19,
    _STRUCT_TYPE: 20,
    _FIELD_TYPE: 21,
    _FIELD_SLICE: 22,
    _MAP_TYPE: 23,
    _GOB_ENCODER_TYPE: 24,
}


# ---------------------------------------------------------------- integers


def encode_uint(x: int) -> bytes:
    if x < 0x80:
        if x < 0:
            raise GobError(f"cannot encode negative value {x} as gob uint")
        return bytes((x,))
    if x > _MAX_UINT:
        raise GobError(f"value {x} does not fit in a gob uint (64 bits)")
    n = (x.bit_length() + 7) // 8
    return bytes((256 - n,)) + x.to_bytes(n, "big")


def encode_int(i: int) -> bytes:
    if not _MIN_INT <= i <= _MAX_INT:
        raise GobError(f"value {i} does not fit in a gob int (64 bits)")
    return encode_uint(i << 1 if i >= 0 else ((~i) << 1) | 1)


def decode_uint(buf: bytes | memoryview, pos: int, end: int | None = None) -> tuple[int, int]:
    if end is None:
        end = len(buf)
    if pos >= end:
        raise GobError("truncated input: expected an unsigned integer")
    c = buf[pos]
    if c < 0x80:
        return c, pos + 1
    n = 256 - c
    if n > 8:
        raise GobError(f"encoded unsigned integer out of range (length byte {c:#04x})")
    if pos + 1 + n > end:
        raise GobError(f"truncated input: unsigned integer needs {n} bytes, {end - pos - 1} left")
    return int.from_bytes(buf[pos + 1 : pos + 1 + n], "big"), pos + 1 + n


def decode_int(buf: bytes | memoryview, pos: int, end: int | None = None) -> tuple[int, int]:
    u, pos = decode_uint(buf, pos, end)
    return (~(u >> 1) if u & 1 else u >> 1), pos


def _float_bits(f: float) -> int:
    return int.from_bytes(_struct.pack("<d", f), "big")


def _bits_float(u: int) -> float:
    return _struct.unpack("<d", u.to_bytes(8, "big"))[0]


# ---------------------------------------------------------------- encoding


class Encoder:
    """One gob stream. Weave uses a fresh one for every message."""

    def __init__(self, type_ids: Mapping[GobType, int] | None = None, first_id: int = 65) -> None:
        self._ids: dict[GobType, int] = dict(_PREDEFINED)
        if type_ids:
            for t, i in type_ids.items():
                if i < _FIRST_USER_ID:
                    raise GobError(f"user type ids start at {_FIRST_USER_ID}, got {i}")
                self._ids[t] = i
        self._used = set(self._ids.values())
        self._next_id = first_id
        self._sent: set[GobType] = set()

    # Ids are assigned as a Go process would on first use: a struct takes its id before its
    # fields' types, a slice/array/map after its element (and key) types.
    def _assign(self, t: GobType) -> int:
        if isinstance(t, Builtin):
            return t.id
        known = self._ids.get(t)
        if known is not None:
            return known
        if isinstance(t, StructType):
            own = self._take_id(t)
            for f in t.fields:
                self._assign(f.type)
            return own
        if isinstance(t, MapType):
            self._assign(t.key)
            self._assign(t.elem)
        elif isinstance(t, SliceType | ArrayType):
            self._assign(t.elem)
        else:
            raise GobError(f"not a gob type: {t!r}")
        return self._take_id(t)

    def _take_id(self, t: GobType) -> int:
        while self._next_id in self._used:
            self._next_id += 1
        self._ids[t] = self._next_id
        self._used.add(self._next_id)
        return self._next_id

    def _definition(self, t: GobType) -> Any:
        common = {"Name": t.name, "Id": self._ids[t]}
        if isinstance(t, StructType):
            fields = [{"Name": f.name, "Id": self._id_of(f.type)} for f in t.fields]
            return {"StructT": {"CommonType": common, "Field": fields}}
        if isinstance(t, SliceType):
            return {"SliceT": {"CommonType": common, "Elem": self._id_of(t.elem)}}
        if isinstance(t, ArrayType):
            return {"ArrayT": {"CommonType": common, "Elem": self._id_of(t.elem), "Len": t.length}}
        assert isinstance(t, MapType)
        return {"MapT": {"CommonType": common, "Key": self._id_of(t.key), "Elem": self._id_of(t.elem)}}

    def _id_of(self, t: GobType) -> int:
        return t.id if isinstance(t, Builtin) else self._ids[t]

    def _define(self, t: GobType, out: bytearray) -> None:
        # Pre-order: the outer type's definition first, then its components, so a
        # definition may refer forward to an id defined later in the stream.
        if isinstance(t, Builtin) or t in self._sent:
            return
        self._sent.add(t)
        body = bytearray(encode_int(-self._ids[t]))
        _encode_value(_WIRE_TYPE, self._definition(t), body)
        out += encode_uint(len(body))
        out += body
        if isinstance(t, StructType):
            for f in t.fields:
                self._define(f.type, out)
        elif isinstance(t, MapType):
            self._define(t.key, out)
            self._define(t.elem, out)
        else:
            self._define(t.elem, out)  # type: ignore[union-attr]

    def encode(self, value: Any, typ: GobType) -> bytes:
        """Definitions this value needs (first use only), then one value message."""
        return self.definitions(typ) + self.value(value, typ)

    def definitions(self, typ: GobType) -> bytes:
        """The definitions `typ` needs that this stream has not sent yet (assigning ids)."""
        out = bytearray()
        self._assign(typ)
        self._define(typ, out)
        return bytes(out)

    def value(self, value: Any, typ: GobType) -> bytes:
        """One value message, without definitions: the caller sends those first."""
        out = bytearray()
        type_id = self._assign(typ)
        body = bytearray(encode_int(type_id))
        if not isinstance(typ, StructType):
            body.append(0)  # the "singleton" field delta of a non-struct top-level value
        _encode_value(typ, value, body)
        out += encode_uint(len(body))
        out += body
        return bytes(out)


# Value encoding does not depend on type ids, so one compiled function per schema serves
# every stream.
_Enc = Callable[[Any, bytearray], None]
_ENCODERS: dict[GobType, _Enc] = {}


def _encode_value(t: GobType, value: Any, out: bytearray) -> None:
    try:
        _encoder(t)(value, out)
    except (TypeError, AttributeError, OverflowError, ValueError, struct_error) as exc:
        raise GobError(f"cannot encode {_short(value)} as {_describe(t)}: {exc}") from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 80 else text[:77] + "..."


def _enc_uint(x: int, out: bytearray) -> None:
    if 0 <= x < 0x80:
        out.append(x)
    else:
        out += encode_uint(x)


def _enc_int(i: int, out: bytearray) -> None:
    out += encode_int(i)


def _enc_string(v: str, out: bytearray) -> None:
    b = v.encode("utf-8", "surrogateescape")
    _enc_uint(len(b), out)
    out += b


def _enc_bytes(v: bytes, out: bytearray) -> None:
    if not isinstance(v, bytes | bytearray | memoryview):
        raise TypeError(f"expected bytes, got {type(v).__name__}")
    _enc_uint(len(v), out)
    out += v


def _enc_bool(v: Any, out: bytearray) -> None:
    out.append(1 if v else 0)


def _enc_float(v: Any, out: bytearray) -> None:
    _enc_uint(_float_bits(float(v)), out)


def _enc_complex(v: Any, out: bytearray) -> None:
    c = complex(v)
    _enc_uint(_float_bits(c.real), out)
    _enc_uint(_float_bits(c.imag), out)


_BUILTIN_ENCODERS: dict[int, _Enc] = {
    1: _enc_bool, 2: _enc_int, 3: _enc_uint, 4: _enc_float, 5: _enc_bytes, 6: _enc_string, 7: _enc_complex,
}


def _zero_test(f: Field) -> Callable[[Any], bool] | None:
    """Go's rule for struct fields left out of the encoding (besides None)."""
    t = f.type
    if isinstance(t, Builtin):
        if t.id in (5, 6):
            return lambda v: len(v) == 0
        return lambda v: not v
    if isinstance(t, SliceType):
        return lambda v: len(v) == 0
    # Maps are omitted only when nil (None); arrays and present structs are always sent.
    return None


def _encoder(t: GobType, depth: int = 0) -> _Enc:
    fn = _ENCODERS.get(t)
    if fn is not None:
        return fn
    if depth > _MAX_DEPTH:
        raise GobError("value nested too deeply to encode")
    if isinstance(t, Builtin):
        fn = _BUILTIN_ENCODERS[t.id]
    elif isinstance(t, StructType):
        fn = _struct_encoder(t, depth)
    elif isinstance(t, SliceType):
        fn = _slice_encoder(_encoder(t.elem, depth + 1), t)
    elif isinstance(t, ArrayType):
        fn = _array_encoder(_encoder(t.elem, depth + 1), t)
    elif isinstance(t, MapType):
        fn = _map_encoder(_encoder(t.key, depth + 1), _encoder(t.elem, depth + 1), t)
    else:
        raise GobError(f"not a gob type: {t!r}")
    _ENCODERS[t] = fn
    return fn


def _struct_encoder(t: StructType, depth: int) -> _Enc:
    plan = [(num, f.name, _encoder(f.type, depth + 1), _zero_test(f)) for num, f in enumerate(t.fields)]

    def enc(value: Any, out: bytearray) -> None:
        get = value.get if isinstance(value, Mapping) else lambda name: getattr(value, name, None)
        last = -1
        for num, name, field_enc, is_zero in plan:
            v = get(name)
            if v is None or (is_zero is not None and is_zero(v)):
                continue
            out.append(num - last)  # field deltas stay far below 128
            last = num
            field_enc(v, out)
        out.append(0)

    return enc


def _nil_element(t: GobType) -> GobError:
    return GobError(f"cannot encode a nil element of {_describe(t)}")


def _slice_encoder(elem: _Enc, t: SliceType) -> _Enc:
    def enc(value: Any, out: bytearray) -> None:
        _enc_uint(len(value), out)
        for item in value:
            if item is None:
                raise _nil_element(t)
            elem(item, out)

    return enc


def _array_encoder(elem: _Enc, t: ArrayType) -> _Enc:
    def enc(value: Any, out: bytearray) -> None:
        if len(value) != t.length:
            raise GobError(f"array of length {t.length} given {len(value)} elements")
        _enc_uint(t.length, out)
        for item in value:
            if item is None:
                raise _nil_element(t)
            elem(item, out)

    return enc


def _map_encoder(key: _Enc, elem: _Enc, t: MapType) -> _Enc:
    def enc(value: Any, out: bytearray) -> None:
        _enc_uint(len(value), out)
        for k, item in value.items():
            if item is None:
                raise _nil_element(t)
            key(k, out)
            elem(item, out)

    return enc


def encode(value: Any, typ: GobType, type_ids: Mapping[GobType, int] | None = None) -> bytes:
    """One value on a fresh Encoder: a self-contained gob stream."""
    return Encoder(type_ids).encode(value, typ)


def encode_stream(
    items: Iterable[tuple[Any, GobType]], type_ids: Mapping[GobType, int] | None = None
) -> bytes:
    enc = Encoder(type_ids)
    return b"".join(enc.encode(v, t) for v, t in items)


# ---------------------------------------------------------------- decoding


@dataclass
class WireDef:
    """A type as a stream defines it: its kind, name, and component type ids."""

    kind: str  # "struct", "slice", "array", "map", "opaque"
    name: str
    elem: int = 0
    key: int = 0
    length: int = 0
    fields: tuple[tuple[str, int], ...] = ()


def _predefined_table() -> dict[int, WireDef]:
    table: dict[int, WireDef] = {}
    for t, i in _PREDEFINED.items():
        if isinstance(t, StructType):
            fields = tuple(
                (f.name, f.type.id if isinstance(f.type, Builtin) else _PREDEFINED[f.type]) for f in t.fields
            )
            table[i] = WireDef("struct", t.name, fields=fields)
        elif isinstance(t, SliceType):
            table[i] = WireDef("slice", t.name, elem=_PREDEFINED[t.elem])
    return table


_PREDEFINED_TABLE = _predefined_table()
_KIND_NAMES = {"ArrayT": "array", "SliceT": "slice", "StructT": "struct", "MapT": "map"}


class Decoder:
    """Reads one gob stream value by value, keeping the stream's type definitions.

    A stream that lasts a whole connection (protocol v1) is given to the decoder a
    message at a time with `feed`, so each definition is parsed once, when it arrives,
    and the work per value does not grow with the definitions before it. The number of
    definitions and their total size are bounded per stream (`max_types`,
    `max_definition_bytes`); passing a bound raises `GobLimitError` before the
    definition is parsed.
    """

    def __init__(
        self,
        data: bytes | bytearray | memoryview = b"",
        *,
        max_types: int = MAX_TYPES,
        max_definition_bytes: int = MAX_DEFINITION_BYTES,
        max_items: int = MAX_ITEMS,
    ) -> None:
        self._buf = bytes(data)
        self._pos = 0
        self._types: dict[int, WireDef] = dict(_PREDEFINED_TABLE)
        self._max_types = max_types
        self._max_definition_bytes = max_definition_bytes
        self._defined = 0
        self._definition_bytes = 0
        self._max_items = max_items
        self._items = 0
        # The end of the message being decoded; reads never go past it.
        self._end = 0
        self._mark = 0
        self._depth = 0
        self._plans: dict[tuple[int, int], Callable[[], Any]] = {}
        self._expects: list[GobType | None] = []
        self._builtin_readers: dict[int, Callable[[], Any]] = {
            1: self._bool, 2: self._int, 3: self._uint, 4: self._float,
            5: self._bytes, 6: self._string, 7: self._complex,
        }

    @property
    def at_end(self) -> bool:
        return self._pos >= len(self._buf)

    @property
    def position(self) -> int:
        return self._pos

    @property
    def definition_count(self) -> int:
        """User type definitions read from this stream so far."""
        return self._defined

    @property
    def definition_bytes(self) -> int:
        """Wire bytes of those definitions (whole messages, length prefixes included)."""
        return self._definition_bytes

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append more of the stream. Input already read is dropped (marks from `skip`
        no longer apply), so a long-lived stream holds only what is not yet read."""
        if self._pos >= len(self._buf):
            self._buf = bytes(data)
        else:
            self._buf = self._buf[self._pos :] + bytes(data)
        self._pos = 0

    def decode(self, expect: GobType | None = None) -> Any:
        """The next value. Definitions in front of it are read and stored."""
        type_id = self._next_value()
        value = self._top_value(type_id, expect)
        # Go ignores whatever follows a value inside its message.
        self._pos = self._end
        return value

    def skip(self) -> int:
        """Pass over the next value without decoding it (definitions in front are still
        read); returns a mark for `decode_at`."""
        self._next_value()
        mark = self._mark
        self._pos = self._end
        return mark

    def decode_at(self, mark: int, expect: GobType | None = None) -> Any:
        """Decode a value passed over by `skip`, with the types known now."""
        saved = self._pos
        self._pos = mark
        try:
            return self.decode(expect)
        finally:
            self._pos = saved

    def _next_value(self) -> int:
        """Read definitions up to the next value message; return its type id, positioned
        on its body. `self._mark` is where the message starts."""
        while True:
            if self.at_end:
                raise GobError("end of gob stream: no more values")
            type_id = self._next_message()
            if type_id < 0:
                self._read_definition(-type_id)
                continue
            if type_id == 0:
                raise GobError("gob message with type id 0")
            return type_id

    def _next_message(self) -> int:
        length, start = decode_uint(self._buf, self._pos)
        if length == 0:
            raise GobError("empty gob message")
        if start + length > len(self._buf):
            raise GobError(
                f"truncated gob message: length {length} but only {len(self._buf) - start} bytes remain"
            )
        self._mark = self._pos
        self._end = start + length
        self._pos = start
        return self._int()

    def consume_definitions(self) -> None:
        """Read the rest of the input as type definitions only (a value there is an error)."""
        while not self.at_end:
            type_id = self._next_message()
            if type_id >= 0:
                raise GobError(f"gob value of type {type_id} where only type definitions were expected")
            self._read_definition(-type_id)

    def read_definitions(self) -> dict[int, WireDef]:
        """`consume_definitions`, then every user type defined so far, by id."""
        self.consume_definitions()
        return {i: d for i, d in self._types.items() if i >= _FIRST_USER_ID}

    def _read_definition(self, type_id: int) -> None:
        if type_id < _FIRST_USER_ID:
            raise GobError(f"gob definition for reserved type id {type_id}")
        if type_id in self._types:
            raise GobError(f"duplicate gob type definition for id {type_id}")
        # Bounds are checked before parsing, so refusing costs nothing.
        if self._defined >= self._max_types:
            raise GobLimitError(f"more than {self._max_types} gob type definitions in one stream")
        size = self._end - self._mark
        if self._definition_bytes + size > self._max_definition_bytes:
            raise GobLimitError(
                f"gob type definitions in one stream exceed {self._max_definition_bytes} bytes"
            )
        self._defined += 1
        self._definition_bytes += size
        self._depth = 0
        self._items = 0
        wire = self._plan(16, _WIRE_TYPE)()
        if self._pos != self._end:
            raise GobError(f"extra data after gob type definition {type_id}")
        present = [k for k in _KIND_NAMES if wire.get(k) is not None]
        opaque = [k for k in ("GobEncoderT", "BinaryMarshalerT", "TextMarshalerT") if wire.get(k) is not None]
        if len(present) + len(opaque) != 1:
            raise GobError(f"gob type definition {type_id} must describe exactly one kind of type")
        if opaque:
            self._types[type_id] = WireDef("opaque", wire[opaque[0]]["CommonType"]["Name"])
            return
        kind = present[0]
        body = wire[kind]
        name = body["CommonType"]["Name"]
        if kind == "StructT":
            fields = tuple((f["Name"], f["Id"]) for f in body["Field"])
            self._types[type_id] = WireDef("struct", name, fields=fields)
        elif kind == "SliceT":
            self._types[type_id] = WireDef("slice", name, elem=body["Elem"])
        elif kind == "ArrayT":
            if body["Len"] < 0:
                raise GobError(f"gob array type {type_id} with negative length")
            self._types[type_id] = WireDef("array", name, elem=body["Elem"], length=body["Len"])
        else:
            self._types[type_id] = WireDef("map", name, key=body["Key"], elem=body["Elem"])

    # -- primitive reads, bounded by the current message

    def _uint(self) -> int:
        pos = self._pos
        if pos < self._end:
            c = self._buf[pos]
            if c < 0x80:  # most uints on the wire are one byte
                self._pos = pos + 1
                return c
        v, self._pos = decode_uint(self._buf, pos, self._end)
        return v

    def _int(self) -> int:
        v, self._pos = decode_int(self._buf, self._pos, self._end)
        return v

    def _bytes(self) -> bytes:
        n = self._uint()
        if n > self._end - self._pos:
            raise GobError(f"gob byte string of length {n} exceeds the {self._end - self._pos} bytes left")
        b = self._buf[self._pos : self._pos + n]
        self._pos += n
        return b

    def _count(self, what: str, min_item_size: int = 1) -> int:
        n = self._uint()
        if n * min_item_size > self._end - self._pos:
            raise GobError(f"gob {what} count {n} exceeds the {self._end - self._pos} bytes left")
        return n

    # -- values

    def _lookup(self, type_id: int) -> WireDef:
        if type_id == _INTERFACE_ID:
            raise GobError("gob interface values are not supported (Weave never sends them)")
        try:
            return self._types[type_id]
        except KeyError:
            raise GobError(f"unknown gob type id {type_id} (not defined in this stream)") from None

    def _top_value(self, type_id: int, expect: GobType | None) -> Any:
        self._depth = 0
        self._items = 0
        if type_id in _BUILTINS or self._lookup(type_id).kind != "struct":
            if self._uint() != 0:
                raise GobError("non-zero delta for singleton: top-level value lacks its 00 marker")
        return self._plan(type_id, expect)()

    # Decoding is compiled: each (wire type, local type) pair gets a closure the first time
    # a value of it appears in this stream, and components are compiled on first use, so
    # a recursive wire type compiles lazily instead of forever.

    def _plan(self, type_id: int, expect: GobType | None) -> Callable[[], Any]:
        key = (type_id, id(expect))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._compile(type_id, expect)
            self._plans[key] = plan
            self._expects.append(expect)  # keeps id(expect) unique while cached
        return plan

    def _compile(self, type_id: int, expect: GobType | None) -> Callable[[], Any]:
        builtin = _BUILTINS.get(type_id)
        if builtin is not None:
            if expect is not None and expect != builtin:
                raise GobError(f"type mismatch: wire sends {builtin.name}, expected {_describe(expect)}")
            return self._builtin_readers[type_id]
        wire = self._lookup(type_id)
        if expect is not None and not _kind_matches(wire.kind, expect):
            raise GobError(
                f"type mismatch: wire sends {wire.kind} {wire.name!r}, expected {_describe(expect)}"
            )
        if wire.kind == "struct":
            return self._compile_struct(wire, expect)  # type: ignore[arg-type]
        if wire.kind == "opaque":
            return self._bytes
        return self._compile_container(wire, expect)

    def _enter(self) -> None:
        self._depth += 1
        if self._depth > _MAX_DEPTH:
            raise GobError("gob value nested too deeply")

    def _spend(self, items: int) -> None:
        # Charged before the objects are made, so a refused value allocates nothing more.
        self._items += items
        if self._items > self._max_items:
            raise GobLimitError(f"gob value with more than {self._max_items} items")

    def _compile_container(self, wire: WireDef, expect: Any) -> Callable[[], Any]:
        kind = wire.kind
        elem_t = expect.elem if expect is not None else None
        elem: list[Callable[[], Any]] = []
        key: list[Callable[[], Any]] = []

        def elem_plan() -> Callable[[], Any]:
            if not elem:
                elem.append(self._plan(wire.elem, elem_t))
            return elem[0]

        if kind == "map":
            key_t = expect.key if expect is not None else None

            def read_map() -> dict[Any, Any]:
                self._enter()
                n = self._count("map", 2)
                self._spend(n)
                if not key:
                    key.append(self._plan(wire.key, key_t))
                read_key, read_elem = key[0], elem_plan()
                out: dict[Any, Any] = {}
                for _ in range(n):
                    k = read_key()
                    try:
                        out[k] = read_elem()
                    except TypeError:
                        raise GobError(f"gob map key {_short(k)} cannot be used as a key") from None
                self._depth -= 1
                return out

            return read_map

        length = wire.length
        if kind == "array" and isinstance(expect, ArrayType) and expect.length != length:
            raise GobError(f"gob array length {length} where {expect.length} expected")

        def read_list() -> list[Any]:
            self._enter()
            n = self._count(kind)
            self._spend(n)
            if kind == "array" and n != length:
                raise GobError(f"gob array length mismatch: type says {length}, value has {n}")
            read = elem_plan()
            out = [read() for _ in range(n)]
            self._depth -= 1
            return out

        return read_list

    def _compile_struct(self, wire: WireDef, expect: StructType | None) -> Callable[[], GobStruct]:
        names = [name for name, _ in wire.fields]
        count = len(names)
        readers: list[Callable[[], Any] | None] = [None] * count
        local = None if expect is None else {f.name: f for f in expect.fields}
        keep = [local is None or name in local for name in names]
        if expect is not None:
            struct_name = expect.name
            zeros = [(f.name, f) for f in expect.fields]
        else:
            struct_name = wire.name
            zeros = [(name, fid) for name, fid in wire.fields]

        def reader(num: int) -> Callable[[], Any]:
            fn = readers[num]
            if fn is None:
                name, fid = wire.fields[num]
                field_t = local[name].type if local is not None and name in local else None
                fn = readers[num] = self._plan(fid, field_t)
            return fn

        read_uint = self._uint
        spend = self._spend
        cost = 1 + len(zeros)

        def read_struct() -> GobStruct:
            self._enter()
            spend(cost)
            values: dict[str, Any] = {}
            num = -1
            while True:
                delta = read_uint()
                if delta == 0:
                    break
                num += delta
                if num >= count:
                    raise GobError(f"gob field number {num} out of bounds for struct {wire.name!r}")
                value = (readers[num] or reader(num))()
                if keep[num]:
                    values[names[num]] = value
            self._depth -= 1
            if expect is not None:
                full = {n: values[n] if n in values else _zero(f) for n, f in zeros}  # type: ignore[arg-type]
            else:
                wire_zero = self._wire_zero
                full = {n: values[n] if n in values else wire_zero(fid) for n, fid in zeros}  # type: ignore[arg-type]
            return GobStruct(struct_name, full)

        return read_struct

    def _string(self) -> str:
        return self._bytes().decode("utf-8", "surrogateescape")

    def _bool(self) -> bool:
        return self._uint() != 0

    def _float(self) -> float:
        return _bits_float(self._uint())

    def _complex(self) -> complex:
        real = _bits_float(self._uint())
        return complex(real, _bits_float(self._uint()))

    def _wire_zero(self, type_id: int) -> Any:
        builtin = _BUILTINS.get(type_id)
        if builtin is not None:
            return _zero(Field("", builtin))
        wire = self._types.get(type_id)
        if wire is None or wire.kind in ("map", "struct"):
            return None  # nil map; an absent struct may be a nil pointer
        if wire.kind == "slice":
            return []
        if wire.kind == "opaque":
            return b""
        return None


def _zero(f: Field) -> Any:
    t = f.type
    if isinstance(t, Builtin):
        return {1: False, 2: 0, 3: 0, 4: 0.0, 5: b"", 6: "", 7: 0j}[t.id]
    if isinstance(t, SliceType):
        return []
    if isinstance(t, ArrayType):
        return [_zero(Field("", t.elem)) for _ in range(t.length)]
    if isinstance(t, MapType) or f.optional:
        return None
    return GobStruct(t.name, {g.name: _zero(g) for g in t.fields})


def _kind_matches(kind: str, expect: GobType) -> bool:
    return (
        (kind == "struct" and isinstance(expect, StructType))
        or (kind == "slice" and isinstance(expect, SliceType))
        or (kind == "array" and isinstance(expect, ArrayType))
        or (kind == "map" and isinstance(expect, MapType))
    )


def _describe(t: GobType) -> str:
    if isinstance(t, Builtin):
        return t.name
    if isinstance(t, StructType):
        return f"struct {t.name!r}"
    return type(t).__name__.removesuffix("Type").lower()


def decode_all(data: bytes | bytearray | memoryview, expect: GobType | None = None) -> list[Any]:
    """Every value in one gob stream."""
    dec = Decoder(data)
    out = []
    while not dec.at_end:
        out.append(dec.decode(expect))
    return out
