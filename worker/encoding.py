"""A rendered image as the bytes stored for it: PNG (default), JPEG or WebP, each carrying the
job's full record (a PNG text chunk; an XMP packet in JPEG and WebP), and the ASCII subset that
travels as S3 object metadata (an HTTP header: no newline, nothing outside printable ASCII)."""

from __future__ import annotations

import io
import json
import re
from typing import Any
from xml.sax.saxutils import escape, unescape

from PIL import Image, PngImagePlugin

from kleinfarm.shared.jobs import DEFAULT_QUALITY, OutputFormat

CONTENT_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
RECORD_NAME = "kleinfarm"  # the PNG text chunk's keyword, the XMP property's name
XMP_NAMESPACE = "https://github.com/kleinfarm/kleinfarm/ns/1.0/"


def encode_image(image: Image.Image, fmt: OutputFormat, quality: int | None, record: dict[str, Any]) -> bytes:
    """``image`` in ``fmt`` with ``record`` embedded where each format keeps text."""
    text = json.dumps(record)
    buffer = io.BytesIO()
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        info.add_itxt(RECORD_NAME, text)
        image.save(buffer, format="PNG", pnginfo=info)
    else:
        options: dict[str, Any] = {"quality": quality or DEFAULT_QUALITY, "xmp": xmp_packet(text)}
        image.save(buffer, format=fmt.upper(), **options)
    return buffer.getvalue()


def xmp_packet(text: str) -> bytes:
    """An XMP packet holding ``text`` as one property of kleinfarm's namespace."""
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description rdf:about="" xmlns:{RECORD_NAME}="{XMP_NAMESPACE}">'
        f"<{RECORD_NAME}:record>{escape(text)}</{RECORD_NAME}:record>"
        '</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
    ).encode()


def embedded_record(data: bytes) -> dict[str, Any]:
    """The record an image carries, whatever its format (for the report and the tests).

    The XMP packet is the one ``xmp_packet`` wrote: its property is found by its tags, with no XML
    parser let loose on a file that may come from elsewhere."""
    image = Image.open(io.BytesIO(data))
    if RECORD_NAME in image.info:
        return dict(json.loads(image.info[RECORD_NAME]))
    packet = image.info.get("xmp") or b""
    text = packet.decode(errors="replace") if isinstance(packet, bytes) else str(packet)
    found = re.search(f"<{RECORD_NAME}:record>(.*?)</{RECORD_NAME}:record>", text, re.DOTALL)
    if found is None:
        raise ValueError("the image carries no kleinfarm record")
    return dict(json.loads(unescape(found.group(1))))


def header_value(text: str) -> str:
    """``text`` as an S3 metadata value, which travels as an HTTP header: printable ASCII only.

    A newline (a YAML ``prompt: |``) would end the header, and a control or non-ASCII character is
    refused or mangled on the way; the image keeps the full text.
    """
    printable = "".join(char if " " <= char <= "~" else (" " if char.isspace() else "?") for char in text)
    return " ".join(printable.split())  # no runs of spaces, none at either end: S3 trims them
