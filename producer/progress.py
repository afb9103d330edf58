"""A live progress bar for a campaign (rich)."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kleinfarm.shared.records import CampaignStatus


class CampaignProgress:
    """Shows finished/total with the counts by state; does nothing when disabled."""

    def __init__(self, campaign_id: str, enabled: bool = True) -> None:
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[counts]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),  # stdout stays for what scripts read (ids, JSON)
            disable=not enabled,
        )
        self._task = self._progress.add_task(campaign_id, total=None, counts="")

    def __enter__(self) -> CampaignProgress:
        self._progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._progress.stop()

    def update(self, status: CampaignStatus) -> None:
        finished = status.succeeded + status.failed + status.cancelled
        counts = (
            f"running {status.running}  ok {status.succeeded}  failed {status.failed}  cancelled {status.cancelled}"
        )
        self._progress.update(self._task, total=status.total, completed=finished, counts=counts)
