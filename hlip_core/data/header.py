"""Reading the few header values ingestion needs, fast.

A DICOM header is a flat list of (tag, VR, length, value) elements up to the pixel data. The fast
reader walks it with ``struct`` and keeps the values of the tags asked for, skipping all others
(patient fields are never decoded). On the real 384-file MRI it reads headers several times faster
than ``pydicom.dcmread(stop_before_pixels=True, specific_tags=...)`` (benchmarks/ingest.py), which
matters for archives of millions of files and for the assembly-vs-dcm2niix bar.

Anything unusual (big-endian or deflated syntaxes, enhanced multi-frame functional groups, an
element running past the end of the file, undefined lengths it cannot follow) makes it give up,
and the caller reads the file with pydicom instead: the fast path is an optimisation, never the
only way.
"""
from __future__ import annotations

import struct

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
PIXEL_DATA = 0x7FE00010
DICOMDIR_CLASS = b"1.2.840.10008.1.3.10"
_LONG_VRS = {b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV", b"SV", b"UV"}
_FALLBACK_SYNTAXES = {"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"}  # deflated, big endian
_NEEDS_PYDICOM = {0x52009229, 0x52009230, 0x00041220}  # functional groups; DICOMDIR records
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_CHUNK = 4096  # most headers fit in one read; reading more would pull in pixel data
_U16, _U32 = struct.Struct("<H"), struct.Struct("<I")
_TAG = struct.Struct("<HH")
_EXPLICIT_HEAD = struct.Struct("<HH2sH")  # group, element, VR, 16-bit length
_IMPLICIT_HEAD = struct.Struct("<HHHH")  # group, element, then the 32-bit length read apart


class Fallback(Exception):
    """The fast reader cannot follow this file; read it with pydicom."""


class _Reader:
    """A window on an open file, refilled on demand (absolute positions)."""

    def __init__(self, fh, size: int):
        self.fh, self.size = fh, size
        self.base, self.buf = 0, fh.read(_CHUNK)

    def get(self, pos: int, n: int) -> bytes:
        end = pos + n
        if end > self.size:
            raise Fallback("element runs past the end of the file")
        if pos < self.base or end > self.base + len(self.buf):
            self.fh.seek(pos)
            self.base, self.buf = pos, self.fh.read(max(n, _CHUNK))
        return self.buf[pos - self.base: end - self.base]


def _element(r: _Reader, pos: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
    """(tag, VR or None, value length, position of the value) of the element at ``pos``."""
    head = r.get(pos, 8)
    group, elem = _TAG.unpack_from(head)
    tag = (group << 16) | elem
    if group == 0xFFFE or implicit:
        return tag, None, _U32.unpack_from(head, 4)[0], pos + 8
    vr = head[4:6]
    if vr in _LONG_VRS:
        return tag, vr, _U32.unpack_from(r.get(pos + 8, 4))[0], pos + 12
    if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
        raise Fallback("not explicit VR where explicit VR was expected")
    return tag, vr, _U16.unpack_from(head, 6)[0], pos + 8


def _skip_undefined(r: _Reader, pos: int, implicit: bool, depth: int = 0) -> int:
    """Position after a sequence of undefined length whose items start at ``pos``."""
    if depth > 8:
        raise Fallback("sequences nested too deep")
    while True:
        tag, _, length, value = _element(r, pos, True)
        if tag == _SEQ_END:
            return value
        if tag != _ITEM:
            raise Fallback("unexpected element inside a sequence")
        if length != _UNDEFINED:
            pos = value + length
            continue
        pos = value
        while True:  # an item of undefined length: elements up to the item delimiter
            tag, vr, length, value = _element(r, pos, implicit)
            if tag == _ITEM_END:
                pos = value
                break
            if length == _UNDEFINED:
                # UN of undefined length holds implicit-VR data (PS3.5 6.2.2)
                pos = _skip_undefined(r, value, implicit or vr == b"UN", depth + 1)
            else:
                pos = value + length


def read_fast(fh, size: int, wanted: set[int]) -> tuple[dict[int, bytes], dict[int, bytes], str, int | None]:
    """Walk a file's header. Returns (values of ``wanted`` dataset tags, values of the file meta
    group, transfer syntax UID, position of the pixel data element or None). Raises Fallback."""
    r = _Reader(fh, size)
    meta: dict[int, bytes] = {}
    pos = 0
    if size >= 132 and r.get(128, 4) == b"DICM":
        pos = 132
        while pos + 8 <= size:
            if _TAG.unpack_from(r.get(pos, 4))[0] != 0x0002:
                break  # the dataset may be implicit VR: look at the group before parsing a VR
            tag, _, length, value = _element(r, pos, False)
            meta[tag] = r.get(value, length)
            pos = value + length
    syntax = meta.get(0x00020010, b"").decode("ascii", "replace").strip(" \x00")
    if meta.get(0x00020002, b"").rstrip(b" \x00") == DICOMDIR_CLASS:
        return {}, meta, syntax or EXPLICIT_LE, None  # an index of other files: nothing more to read
    if not syntax:  # no file meta: guess from the first element
        vr = r.get(pos + 4, 2) if pos + 6 <= size else b""
        syntax = EXPLICIT_LE if vr in _LONG_VRS or (len(vr) == 2 and 65 <= vr[0] <= 90 and 65 <= vr[1] <= 90) else IMPLICIT_LE
    if syntax in _FALLBACK_SYNTAXES:
        raise Fallback("big-endian or deflated transfer syntax")
    implicit = syntax == IMPLICIT_LE
    values: dict[int, bytes] = {}
    # the loop of _element and _Reader.get inlined for elements lying in the current window (the
    # header pass is most of discovery: this walk reads ~2x as many files/s as calling them);
    # elements at the window's edge go through _element, which moves the window
    head = _IMPLICIT_HEAD if implicit else _EXPLICIT_HEAD
    buf, base = r.buf, r.base
    while pos + 8 <= size:
        off = pos - base
        if 0 <= off and off + 12 <= len(buf):
            group, elem, vr, short = head.unpack_from(buf, off)
            tag = (group << 16) | elem
            if implicit or group == 0xFFFE:
                length, value, vr = _U32.unpack_from(buf, off + 4)[0], pos + 8, None
            elif vr in _LONG_VRS:
                length, value = _U32.unpack_from(buf, off + 8)[0], pos + 12
            elif 65 <= vr[0] <= 90 and 65 <= vr[1] <= 90:
                length, value = short, pos + 8
            else:
                raise Fallback("not explicit VR where explicit VR was expected")
        else:
            tag, vr, length, value = _element(r, pos, implicit)
            buf, base = r.buf, r.base
        if tag == PIXEL_DATA:
            return values, meta, syntax, pos
        if tag in _NEEDS_PYDICOM:
            raise Fallback("functional groups or directory records")
        if length == _UNDEFINED:
            pos = _skip_undefined(r, value, implicit or vr == b"UN")
            buf, base = r.buf, r.base
            continue
        if tag in wanted:
            start = value - base
            if start >= 0 and start + length <= len(buf):
                values[tag] = buf[start: start + length]
            else:
                values[tag] = r.get(value, length)
                buf, base = r.buf, r.base
        pos = value + length
    return values, meta, syntax, None


class FastFields:
    """Typed access to raw values from read_fast (little endian)."""

    def __init__(self, values: dict[int, bytes], meta: dict[int, bytes], syntax: str):
        self.values, self.meta, self.syntax = values, meta, syntax
        self.implicit = syntax == IMPLICIT_LE
        self._encodings = None

    def has(self, tag: int) -> bool:
        return tag in self.values

    def text(self, tag: int) -> str:
        v = self.values.get(tag)
        return v.decode("ascii", "replace").strip(" \x00") if v else ""

    def meta_text(self, tag: int) -> str:
        v = self.meta.get(tag)
        return v.decode("ascii", "replace").strip(" \x00") if v else ""

    def us(self, tag: int) -> int | None:
        v = self.values.get(tag)
        return _U16.unpack_from(v)[0] if v and len(v) >= 2 else None

    def fd(self, tag: int, n: int = 1) -> tuple | None:
        v = self.values.get(tag)
        if not v or len(v) < 8 * n:
            return None
        return struct.unpack_from(f"<{n}d", v)

    def label(self, tag: int) -> str:
        """A text in the dataset's character set (descriptions, names of things)."""
        v = self.values.get(tag)
        if not v:
            return ""
        charset = self.text(0x00080005)
        if not charset or charset in ("ISO_IR 100", "ISO_IR 6", "ISO_IR 192"):
            codec = "utf-8" if charset == "ISO_IR 192" else "latin-1"
            return v.decode(codec, "replace").strip(" \x00")
        from pydicom.charset import convert_encodings, decode_bytes

        if self._encodings is None:
            self._encodings = convert_encodings([c.strip() for c in charset.split("\\")])
        return decode_bytes(v, self._encodings, set()).strip(" \x00")


class PydicomFields:
    """The same access on a pydicom Dataset (the fallback; keeps ``ds`` for sequences)."""

    def __init__(self, ds):
        self.ds = ds
        meta = getattr(ds, "file_meta", None)
        self._meta = meta
        syntax = str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""
        self.syntax = syntax or (IMPLICIT_LE if ds.is_implicit_VR else EXPLICIT_LE)
        self.implicit = self.syntax == IMPLICIT_LE

    def has(self, tag: int) -> bool:
        return tag in self.ds

    def _value(self, tag: int):
        try:
            elem = self.ds.get_item(tag)
        except (KeyError, TypeError):
            return None
        if elem is None:
            return None
        value = elem.value
        if isinstance(value, bytes) and type(elem).__name__ == "RawDataElement" and self.ds.is_little_endian:
            return value
        return self.ds[tag].value

    def text(self, tag: int) -> str:
        v = self._value(tag)
        if v is None:
            return ""
        if isinstance(v, bytes):
            return v.decode("ascii", "replace").strip(" \x00")
        if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
            return "\\".join(str(x) for x in v)
        return str(v).strip()

    def meta_text(self, tag: int) -> str:
        if self._meta is None or tag not in self._meta:
            return ""
        return str(self._meta[tag].value).strip(" \x00")

    def us(self, tag: int) -> int | None:
        v = self._value(tag)
        if isinstance(v, bytes):
            return _U16.unpack_from(v)[0] if len(v) >= 2 else None
        if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
            v = v[0] if len(v) else None
        try:
            return None if v is None else int(v)
        except (TypeError, ValueError):
            return None

    def fd(self, tag: int, n: int = 1) -> tuple | None:
        v = self._value(tag)
        if v is None:
            return None
        if isinstance(v, bytes):
            return struct.unpack_from(f"<{n}d", v) if len(v) >= 8 * n else None
        seq = list(v) if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue" else [v]
        try:
            return tuple(float(x) for x in seq[:n]) if len(seq) >= n else None
        except (TypeError, ValueError):
            return None

    def label(self, tag: int) -> str:
        if tag not in self.ds:
            return ""
        v = self.ds[tag].value
        if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
            return "\\".join(str(x) for x in v).strip()
        return "" if v is None else str(v).strip()
