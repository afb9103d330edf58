"""Producers: the Python client, campaign files and the ``kleinfarm`` CLI. No torch here."""

from kleinfarm.producer.client import CampaignHandle, FarmClient

__all__ = ["CampaignHandle", "FarmClient"]
