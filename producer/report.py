"""The campaign report: one HTML page with every image as a thumbnail beside its prompt, seed,
size, timings and, for a failure, its message. Self-contained (thumbnails inlined), so it opens the
same from S3, a mail attachment or a local disk."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from PIL import Image

from kleinfarm.producer.client import CampaignHandle
from kleinfarm.producer.report_timeline import campaign_figures, timeline_svg
from kleinfarm.shared.errors import KleinfarmError
from kleinfarm.shared.manifest import report_key

THUMB_PX = 192
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")  # what the farm stores and accepts as references; no other parser runs
REF_PX = 64
STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:16px}
.job{border:1px solid #ddd;border-radius:6px;padding:8px}
.job.failed{border-color:#c33;background:#fff4f4}.job.cancelled{opacity:.6}
.job img{max-width:100%;display:block;margin-bottom:6px}
.meta{font-size:12px;color:#555}.error{color:#a00;font-size:12px}
.refs{display:flex;gap:4px;margin-bottom:4px}.refs img{width:48px;height:48px;object-fit:cover}
svg text.lane{font-size:11px;fill:#555}
"""


def build_report(handle: CampaignHandle) -> str:
    """The report's HTML, with each finished image read back from storage as a thumbnail."""
    status = handle.status()
    records = list(handle.client.state.jobs(handle.id))
    cards = [_card(handle, record.manifest_row()) for record in records]
    counts = ", ".join(
        f"{key} {value}"
        for key, value in status.as_dict().items()
        if type(value) is int  # not the bool flags
    )
    title = html.escape(f"{status.name} ({handle.id})")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{STYLE}</style></head>"
        f"<body><h1>{title}</h1><p id='counts'>{html.escape(counts)}</p>"
        f"<p id='figures'>{html.escape(campaign_figures(records).describe())}</p>"
        f"<h2>Where the time went</h2>{timeline_svg(records)}"
        f"<h2>Jobs</h2><div class='grid'>{''.join(cards)}</div></body></html>"
    )


def write_report(handle: CampaignHandle) -> tuple[str, str]:
    """Build the report and put it beside the campaign's images; return (key, html)."""
    page = build_report(handle)
    key = report_key(handle.client.state.campaign_meta(handle.id)["output_prefix"], handle.id)
    handle.client.storage.put(key, page.encode(), "text/html; charset=utf-8")
    return key, page


def _card(handle: CampaignHandle, row: dict[str, Any]) -> str:
    image = ""
    if row["state"] == "succeeded" and row["key"]:
        image = f"<img alt='{html.escape(row['job_id'])}' src='data:image/png;base64,{_thumbnail(handle, row['key'])}'>"
    image = _before(handle, row["references"]) + image
    timings = " · ".join(
        f"{name.removesuffix('_s')} {seconds:.2f} s" for name, seconds in (row["timings"] or {}).items()
    )
    error = f"<div class='error'>{html.escape(row['error'])}</div>" if row["error"] else ""
    return (
        f"<div class='job {html.escape(row['state'])}' data-job='{html.escape(row['job_id'])}'>{image}"
        f"<b>{html.escape(row['job_id'])}</b> <span class='state'>{html.escape(row['state'])}</span>"
        f"<div class='prompt'>{html.escape(row['prompt'] or '')}</div>"
        f"<div class='meta'>seed {row['seed']} · {row['width']}x{row['height']}"
        f"{' · K/V ' + html.escape(row['kv']) if row['kv'] else ''} · {html.escape(timings)}</div>"
        f"{error}</div>"
    )


def _before(handle: CampaignHandle, references: list[str]) -> str:
    """The edit's references, small, beside its output (before and after); only those in the farm's
    own bucket are read back: the report fetches nothing a campaign file names elsewhere."""
    own = f"s3://{handle.client.storage.bucket}/"
    inlined = [_reference_thumbnail(handle, url.removeprefix(own)) for url in references if url.startswith(own)]
    thumbs = [f"<img class='ref' alt='reference' src='data:image/png;base64,{data}'>" for data in inlined if data]
    return f"<div class='refs'>{''.join(thumbs)}</div>" if thumbs else ""


def _reference_thumbnail(handle: CampaignHandle, key: str) -> str | None:
    """A reference's thumbnail; None for one that is gone or not an image (the job's card says why)."""
    try:
        return _thumbnail(handle, key, REF_PX, handle.client.settings.reference_max_bytes)
    except (KleinfarmError, OSError, Image.DecompressionBombError):
        return None


def _thumbnail(handle: CampaignHandle, key: str, side: int = THUMB_PX, max_bytes: int | None = None) -> str:
    data = handle.client.storage.get(key, max_bytes=max_bytes)
    with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
        image.thumbnail((side, side))
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
