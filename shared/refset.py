"""The reference-set key: the identity under which a set's attention K/V are cached and routed.

A set's K/V depend on the model weights, the ordered reference *contents* after preprocessing and
their positions, never on the prompt, seed, output size or step (``docs/engine.md``, "How the
KV variant works"). So the key hashes exactly those, and never a URL, whose content can change.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

# Bump when the reference preprocessing changes: old cache entries must not match new ones.
PREPROCESSING_VERSION = "diffusers-flux2-klein-v1:area<=1024x1024,floor16,crop"


def content_digest(data: bytes) -> str:
    """sha256 of a reference's bytes, hex."""
    return hashlib.sha256(data).hexdigest()


def route_key(locators: Sequence[str]) -> str:
    """The routing key of an ordered reference set, from its locators, known at submit time.

    The router groups jobs by it; the worker maps it to the content key it cached under, and
    publishes the routing keys of the sets it holds.
    """
    return "rt-" + hashlib.sha256("\n".join(locators).encode()).hexdigest()[:32]


def reference_set_key(model: str, digests: Sequence[str], preprocessing: str = PREPROCESSING_VERSION) -> str:
    """Key of an ordered reference set for ``model``; order matters (position ids depend on it)."""
    payload = json.dumps({"model": model, "refs": list(digests), "prep": preprocessing}, separators=(",", ":"))
    return "rs-" + hashlib.sha256(payload.encode()).hexdigest()
