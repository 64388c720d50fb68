"""multipart/form-data with the standard library only (Python 3.13 has no ``cgi``).

- ``MultipartBody``: an upload body of files and fields, streamed from disk in chunks with its
  length known in advance (so the request carries a Content-Length and progress is exact).
- ``read_multipart``: a streaming parser of an answer; each part's bytes go to a sink the
  caller chooses (memory for the JSON, a file for a heat map), so a large answer never sits in
  memory twice.
"""
from __future__ import annotations

import email.message
import email.parser
import email.policy
import os
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Protocol

CRLF = b"\r\n"
MAX_HEADER_BYTES = 16 * 1024


class MultipartError(ValueError):
    """A multipart body that does not follow RFC 7578 (truncated, no boundary, huge headers)."""


@dataclass
class FilePart:
    """A file sent as form field ``name`` with the file name ``filename``."""

    name: str
    path: str
    filename: str
    content_type: str = "application/octet-stream"


@dataclass
class FieldPart:
    """A text field."""

    name: str
    value: str
    content_type: Optional[str] = None


def _quote(value: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError(f"a multipart name or file name cannot contain a line break: {value!r}")
    return value.replace("\\", "\\\\").replace('"', '\\"')


class MultipartBody:
    """A multipart/form-data body of ``parts``; ``len(body)`` bytes, sent by iterating ``chunks()``."""

    def __init__(self, parts: list, boundary: Optional[str] = None):
        self.parts = list(parts)
        self.boundary = boundary or f"hlip-{uuid.uuid4().hex}"
        self._heads: list[bytes] = []
        for part in self.parts:
            if isinstance(part, FilePart):
                head = (f'--{self.boundary}\r\nContent-Disposition: form-data; name="{_quote(part.name)}"; '
                        f'filename="{_quote(part.filename)}"\r\nContent-Type: {part.content_type}\r\n\r\n')
            elif isinstance(part, FieldPart):
                head = f'--{self.boundary}\r\nContent-Disposition: form-data; name="{_quote(part.name)}"\r\n'
                head += f"Content-Type: {part.content_type}\r\n\r\n" if part.content_type else "\r\n"
            else:
                raise TypeError(f"not a multipart part: {part!r}")
            self._heads.append(head.encode("utf-8"))
        self._tail = f"--{self.boundary}--\r\n".encode("ascii")

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def _size(self, part) -> int:
        return os.path.getsize(part.path) if isinstance(part, FilePart) else len(part.value.encode("utf-8"))

    def __len__(self) -> int:
        return sum(len(h) + self._size(p) + len(CRLF) for h, p in zip(self._heads, self.parts)) + len(self._tail)

    def chunks(self, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """The body in pieces of at most ``chunk_size`` bytes of file data (headers come alone)."""
        for head, part in zip(self._heads, self.parts):
            yield head
            if isinstance(part, FilePart):
                with open(part.path, "rb") as f:
                    while True:
                        piece = f.read(chunk_size)
                        if not piece:
                            break
                        yield piece
            else:
                yield part.value.encode("utf-8")
            yield CRLF
        yield self._tail


def boundary_of(content_type: str) -> str:
    """The boundary parameter of a ``multipart/...`` Content-Type header."""
    message = email.message.Message()
    message["Content-Type"] = content_type
    if message.get_content_maintype() != "multipart":
        raise MultipartError(f"not a multipart answer: {content_type!r}")
    boundary = message.get_param("boundary")
    if not boundary or not isinstance(boundary, str):
        raise MultipartError(f"the multipart answer names no boundary: {content_type!r}")
    return boundary


@dataclass
class PartHeaders:
    name: Optional[str]
    filename: Optional[str]
    content_type: str
    headers: dict


def parse_part_headers(raw: bytes) -> PartHeaders:
    message = email.parser.BytesHeaderParser(policy=email.policy.HTTP).parsebytes(raw + b"\r\n\r\n")
    name = message.get_param("name", header="content-disposition")
    return PartHeaders(name=str(name) if name is not None else None, filename=message.get_filename(),
                       content_type=message.get_content_type(), headers={k.lower(): str(v) for k, v in message.items()})


class Sink(Protocol):
    def write(self, data) -> object: ...


def read_multipart(read: Callable[[int], bytes], boundary: str, open_part: Callable[[PartHeaders], Sink],
                   close_part: Callable[[PartHeaders, Sink], None], chunk_size: int = 1 << 20,
                   on_bytes: Optional[Callable[[int], None]] = None) -> int:
    """Parse a multipart body read by ``read(n)`` (b"" at the end), part by part.

    For each part: ``sink = open_part(headers)``, its bytes are written to ``sink`` as they
    arrive, then ``close_part(headers, sink)``. ``on_bytes(total_read)`` is called after each
    read (progress, cancellation). Returns the number of parts. Raises MultipartError when the
    body is truncated or malformed."""
    delimiter = b"--" + boundary.encode("latin-1")
    separator = CRLF + delimiter  # what ends a part's data
    buf = bytearray()
    total = 0
    eof = False

    def fill() -> None:
        nonlocal total, eof
        piece = read(chunk_size)
        if not piece:
            eof = True
            return
        buf.extend(piece)
        total += len(piece)
        if on_bytes is not None:
            on_bytes(total)

    def need(n: int) -> None:
        while len(buf) < n and not eof:
            fill()
        if len(buf) < n:
            raise MultipartError("the multipart answer ends early (connection closed?)")

    # the preamble (usually empty) ends at the first delimiter at the start of a line
    start = 0
    while True:
        at = buf.find(delimiter, start)
        if at == 0 or (at > 0 and buf[at - 2:at] == CRLF):
            del buf[: at + len(delimiter)]
            break
        if at > 0:  # the delimiter's bytes inside the preamble's text: look further
            start = at + 1
            continue
        if eof:
            raise MultipartError("no multipart delimiter in the answer")
        start = max(0, len(buf) - len(delimiter) - 2)
        fill()

    parts = 0
    while True:
        need(2)
        if buf[:2] == b"--":
            return parts  # the close delimiter; anything after it is an epilogue
        # transport padding (spaces, tabs) may follow the delimiter before its CRLF
        while True:
            line_end = buf.find(CRLF)
            if line_end >= 0:
                break
            if len(buf) > MAX_HEADER_BYTES:
                raise MultipartError("a multipart delimiter line is too long")
            need(len(buf) + 1)
        if buf[:line_end].strip(b" \t"):
            raise MultipartError("unexpected bytes after a multipart delimiter")
        del buf[: line_end + 2]
        search = 0
        while True:
            head_end = buf.find(b"\r\n\r\n", search)
            if head_end >= 0:
                break
            if buf.startswith(CRLF):  # a part without headers
                head_end = -2
                break
            if len(buf) > MAX_HEADER_BYTES:
                raise MultipartError("a multipart part's headers are larger than 16 KB")
            search = max(0, len(buf) - 3)
            need(len(buf) + 1)
        headers = parse_part_headers(bytes(buf[:head_end]) if head_end > 0 else b"")
        del buf[: head_end + 4]
        sink = open_part(headers)
        search = 0
        while True:
            at = buf.find(separator, search)
            if at >= 0:
                if at:
                    sink.write(buf[:at])  # a copy: the buffer is resized right after
                del buf[: at + len(separator)]
                break
            keep = len(separator) - 1  # a separator may straddle two reads
            if len(buf) > keep:
                cut = len(buf) - keep
                sink.write(buf[:cut])
                del buf[:cut]
            if eof:
                raise MultipartError("the multipart answer ends inside a part (connection closed?)")
            search = 0
            fill()
        close_part(headers, sink)
        parts += 1
