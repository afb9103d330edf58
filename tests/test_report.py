"""The campaign report, rendered by headless Chromium: what a person opening it sees."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from kleinfarm.producer.client import FarmClient
from kleinfarm.shared.jobs import Campaign
from kleinfarm.shared.storage import Storage

from conftest import WorkerPool

REFS = Path(__file__).parent.parent / "examples" / "refs"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def rendered_dom(page: Path, profile: Path) -> str:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Chromium is installed by `make test` (apt-get install chromium)"
    dumped = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return dumped.stdout


def test_the_report_shows_thumbnails_prompts_seeds_and_failures(
    client: FarmClient, storage: Storage, farm_env: dict[str, str], workers: WorkerPool, tmp_path: Path
) -> None:
    storage.client.put_object(Bucket=storage.bucket, Key="report/ref.png", Body=(REFS / "logo.png").read_bytes())
    jobs = [
        {"id": "mug", "prompt": "a mug <on> marble", "seed": 11},
        {"id": "lamp", "prompt": "a brass lamp", "seed": 12, "width": 320},
        {"id": "broken", "prompt": "needs a ref", "references": [f"s3://{storage.bucket}/none/x.png"]},
        {"id": "edit", "prompt": "on brand", "references": [f"s3://{storage.bucket}/report/ref.png"]},
    ]
    handle = client.submit(Campaign.from_raw("report", jobs, defaults={"width": 256, "height": 256}))
    handle.wait(progress=False, timeout=300)
    out = tmp_path / "report.html"
    made = subprocess.run(
        [sys.executable, "-m", "kleinfarm.producer", "report", handle.id, "--out", str(out)],
        env={**os.environ, **farm_env}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert storage.get(f"kleinfarm/{handle.id}/report.html").decode() == out.read_text()

    dom = rendered_dom(out, tmp_path / "chromium")
    assert dom.count("data:image/png;base64,") == 4  # three outputs, and the edit's reference beside its output
    # Its set may be held already (another test rendered that logo): a miss or a hit, either way named.
    assert dom.count('class="ref"') == 1 and re.search(r"K/V (miss|device|host)", dom)
    assert "a mug &lt;on&gt; marble" in dom and "seed 11" in dom and "320x256" in dom
    assert 'class="job failed"' in dom and f"s3://{storage.bucket}/none/x.png does not exist" in dom
    assert "succeeded 3" in dom and "failed 1" in dom
    # Where the time went: a bar per rendered job on its worker's lane, and the campaign's figures.
    assert 'id="timeline"' in dom and dom.count('class="job-bar"') == 3 and dom.count('class="render"') == 3
    assert "images per hour" in dom and re.search(r"K/V hit rate (0|100)% \((0|1) of 1 edits\)", dom)
