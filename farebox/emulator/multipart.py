"""multipart/form-data, as far as the Files API needs it: named fields, one of them a file.

Hand-rolled rather than a dependency: the upload is a whole body already in memory, and the format
is only delimiter splitting (RFC 7578); the header parameters go through the standard email parser.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.message import Message

from farebox.emulator.wire import BadRequest


@dataclass(frozen=True)
class FormField:
    data: bytes
    filename: str | None  # set for a file part


def _params(value: str) -> Message:
    message = Message()
    message["content-type"] = value
    return message


def parse_form(content_type: str, body: bytes) -> dict[str, FormField]:
    header = _params(content_type)
    boundary = header.get_param("boundary")
    if header.get_content_type() != "multipart/form-data" or not isinstance(boundary, str) or not boundary:
        raise BadRequest("the body must be multipart/form-data with a boundary")
    # Every delimiter but the first follows a CRLF that belongs to it, not to the part before.
    chunks = (b"\r\n" + body).split(b"\r\n--" + boundary.encode("latin-1"))
    fields: dict[str, FormField] = {}
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):  # the closing delimiter
            return fields
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise BadRequest("a multipart part has no header block")
        name, filename = _disposition(head.decode("latin-1"))
        fields[name] = FormField(data, filename)
    raise BadRequest("the multipart body has no closing delimiter")


def _disposition(head: str) -> tuple[str, str | None]:
    for line in head.split("\r\n"):
        key, _, value = line.partition(":")
        if key.strip().lower() == "content-disposition":
            message = Message()
            message["content-disposition"] = value.strip()
            name = message.get_param("name", header="content-disposition")
            filename = message.get_filename()
            if isinstance(name, str) and name:
                return name, None if filename is None else _utf8(filename)
    raise BadRequest("a multipart part has no Content-Disposition name")


def _utf8(text: str) -> str:
    # Filenames are raw UTF-8 on the wire (httpx sends them so), and the header was read as latin-1;
    # an RFC 2231 filename* is already decoded and may not go back to latin-1.
    try:
        return text.encode("latin-1").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return text
