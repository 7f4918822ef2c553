"""multipart/form-data parsed from a body already in memory, synchronously, so that it can run off the event loop.

Starlette's own parser is asynchronous and runs on the loop; the body here is
bounded (the server's --max-body-mb) and read whole first, so a plain parse
in a worker thread keeps the loop free for other requests.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from .errors import BadRequest


@dataclass
class Part:
    name: str = ""
    filename: str | None = None  # None: a text field
    data: bytearray = field(default_factory=bytearray)
    headers: dict = field(default_factory=dict)


def parse_form(body: bytes, content_type: str, max_parts: int) -> list:
    """The parts of a multipart/form-data body, in order."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequest("the multipart Content-Type has no boundary")
    parts: list = []
    header: dict = {"field": b"", "value": b""}

    def begin():
        if len(parts) >= max_parts:
            raise BadRequest(f"more than {max_parts} parts in the form", 413)
        parts.append(Part())

    def header_end():
        parts[-1].headers[header["field"].lower()] = header["value"]
        header["field"] = header["value"] = b""

    def headers_finished():
        _, options = parse_options_header(parts[-1].headers.get(b"content-disposition", b""))
        if b"name" not in options:
            raise BadRequest("a form part has no name in its Content-Disposition")
        parts[-1].name = options[b"name"].decode("utf-8", "replace")
        if b"filename" in options:
            parts[-1].filename = options[b"filename"].decode("utf-8", "replace")

    callbacks = {
        "on_part_begin": begin,
        "on_part_data": lambda data, start, end: parts[-1].data.extend(data[start:end]),
        "on_header_field": lambda data, start, end: header.__setitem__("field", header["field"] + data[start:end]),
        "on_header_value": lambda data, start, end: header.__setitem__("value", header["value"] + data[start:end]),
        "on_header_end": header_end,
        "on_headers_finished": headers_finished,
    }
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except MultipartParseError as e:
        raise BadRequest(f"not a readable multipart form ({e})") from None
    return parts
