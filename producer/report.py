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
from kleinfarm.shared.manifest import report_key

THUMB_PX = 192
STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:16px}
.job{border:1px solid #ddd;border-radius:6px;padding:8px}
.job.failed{border-color:#c33;background:#fff4f4}.job.cancelled{opacity:.6}
.job img{max-width:100%;display:block;margin-bottom:6px}
.meta{font-size:12px;color:#555}.error{color:#a00;font-size:12px}
"""


def build_report(handle: CampaignHandle) -> str:
    """The report's HTML, with each finished image read back from storage as a thumbnail."""
    status = handle.status()
    cards = [_card(handle, record.manifest_row()) for record in handle.client.state.jobs(handle.id)]
    counts = ", ".join(
        f"{key} {value}"
        for key, value in status.as_dict().items()
        if type(value) is int  # not the bool flags
    )
    title = html.escape(f"{status.name} ({handle.id})")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{STYLE}</style></head>"
        f"<body><h1>{title}</h1><p id='counts'>{html.escape(counts)}</p>"
        f"<div class='grid'>{''.join(cards)}</div></body></html>"
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
    timings = " · ".join(
        f"{name.removesuffix('_s')} {seconds:.2f} s" for name, seconds in (row["timings"] or {}).items()
    )
    error = f"<div class='error'>{html.escape(row['error'])}</div>" if row["error"] else ""
    return (
        f"<div class='job {html.escape(row['state'])}' data-job='{html.escape(row['job_id'])}'>{image}"
        f"<b>{html.escape(row['job_id'])}</b> <span class='state'>{html.escape(row['state'])}</span>"
        f"<div class='prompt'>{html.escape(row['prompt'] or '')}</div>"
        f"<div class='meta'>seed {row['seed']} · {row['width']}x{row['height']} · {html.escape(timings)}</div>"
        f"{error}</div>"
    )


def _thumbnail(handle: CampaignHandle, key: str) -> str:
    with Image.open(io.BytesIO(handle.client.storage.get(key))) as image:
        image.thumbnail((THUMB_PX, THUMB_PX))
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
