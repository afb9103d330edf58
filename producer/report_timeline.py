"""Where a campaign's time went, for its report: a timeline per worker and the campaign's figures.

Each job is a bar on its worker's lane, from its claim: fetching references, the prompt, the
render (denoise and decode), each in its own colour; storing (encode and upload, done while the
next job renders) is a thin bar below, ending when the job was recorded. Gaps between bars are
time the worker had no job. Drawn as inline SVG: the report stays one self-contained file.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

from kleinfarm.shared.records import JobRecord

WIDTH_PX = 960
LANE_PX = 34
LABEL_PX = 150
PHASES = (  # (name, colour, timing keys summed)
    ("fetch", "#8e6cc0", ("fetch_s",)),
    ("prompt", "#e0a030", ("prompt_s",)),
    ("render", "#3a7bd5", ("setup_s", "denoise_s", "decode_s")),
)
STORE_COLOUR = "#4caf50"


@dataclass(frozen=True)
class CampaignFigures:
    images: int
    images_per_hour: float | None
    kv_hits: int
    kv_lookups: int

    def describe(self) -> str:
        rate = f"{self.images_per_hour:,.0f} images per hour" if self.images_per_hour else "no image yet"
        hits = f"K/V hit rate {self.kv_hits / self.kv_lookups:.0%} ({self.kv_hits} of {self.kv_lookups} edits)"
        return f"{rate} · {hits if self.kv_lookups else 'no edit jobs'}"


def campaign_figures(records: list[JobRecord]) -> CampaignFigures:
    """Images per hour from the first claim to the last image recorded; hits among edit jobs."""
    done = [r for r in records if r.state == "succeeded" and r.started and r.finished]
    rate = None
    if done:
        span = max(r.finished or 0.0 for r in done) - min(r.started or 0.0 for r in done)
        rate = len(done) * 3600 / span if span > 0 else None
    edits = [r for r in done if r.kv not in (None, "none")]
    hits = sum(r.kv in ("device", "host") for r in edits)
    return CampaignFigures(len(done), rate, hits, len(edits))


def timeline_svg(records: list[JobRecord]) -> str:
    """One lane per worker, one bar per job: claim, fetch, prompt, render; storing below it."""
    jobs = [r for r in records if r.worker and r.started and r.finished and r.timings]
    if not jobs:
        return "<p class='meta'>no timeline: no job has run yet</p>"
    start = min(r.started or 0.0 for r in jobs)
    span = max(max(r.finished or 0.0 for r in jobs) - start, 1e-6)
    scale = (WIDTH_PX - LABEL_PX - 10) / span
    workers = sorted({str(r.worker) for r in jobs})
    parts = [_legend()]
    for lane, worker in enumerate(workers):
        y = 24 + lane * LANE_PX
        parts.append(f"<text x='0' y='{y + 13}' class='lane'>{html.escape(worker[:22])}</text>")
        for record in (r for r in jobs if r.worker == worker):
            parts.append(_bar(record, LABEL_PX + ((record.started or 0.0) - start) * scale, y, scale))
    height = 24 + len(workers) * LANE_PX
    axis = f"<text x='{WIDTH_PX - 10}' y='{height}' text-anchor='end' class='lane'>{span:.1f} s</text>"
    return (
        f"<svg id='timeline' xmlns='http://www.w3.org/2000/svg' width='{WIDTH_PX}' height='{height + 6}'>"
        f"{''.join(parts)}{axis}</svg>"
    )


def _bar(record: JobRecord, x: float, y: float, scale: float) -> str:
    timings = record.timings or {}
    segments = []
    for name, colour, keys in PHASES:
        seconds = sum(float(timings.get(key, 0.0)) for key in keys)
        width = max(seconds * scale, 0.5)
        tip = f"{record.local_id} {name} {seconds:.2f} s" + (
            f" (K/V {record.kv})" if name == "render" and record.kv else ""
        )
        segments.append(
            f"<rect class='{name}' x='{x:.1f}' y='{y}' width='{width:.1f}' height='18' fill='{colour}'>"
            f"<title>{html.escape(tip)}</title></rect>"
        )
        x += width
    stored = float(timings.get("upload_s", 0.0))  # after the render, beside the next job's
    tip = html.escape(f"{record.local_id} encode and upload {stored:.2f} s")
    segments.append(
        f"<rect class='store' x='{x:.1f}' y='{y + 20}' width='{max(stored * scale, 0.5):.1f}' height='5' "
        f"fill='{STORE_COLOUR}'><title>{tip}</title></rect>"
    )
    return f"<g class='job-bar' data-job='{html.escape(record.local_id)}'>{''.join(segments)}</g>"


def _legend() -> str:
    items = [(name, colour) for name, colour, _keys in PHASES] + [("encode + upload", STORE_COLOUR)]
    parts, x = [], LABEL_PX
    for name, colour in items:
        parts.append(f"<rect x='{x}' y='2' width='12' height='12' fill='{colour}'/>")
        parts.append(f"<text x='{x + 16}' y='12' class='lane'>{html.escape(name)}</text>")
        x += 40 + 8 * len(name)
    return "".join(parts)
