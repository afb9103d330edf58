"""The reference-set key: the identity under which a set's attention K/V are cached and routed.

A set's K/V depend on the model weights, the ordered reference *contents* after preprocessing and
their positions, never on the prompt, seed, output size or step (FACTS.md, "How the KV variant
works"). So the key hashes exactly those, and never a URL, whose content can change.
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


def reference_set_key(model: str, digests: Sequence[str], preprocessing: str = PREPROCESSING_VERSION) -> str:
    """Key of an ordered reference set for ``model``; order matters (position ids depend on it)."""
    payload = json.dumps({"model": model, "refs": list(digests), "prep": preprocessing}, separators=(",", ":"))
    return "rs-" + hashlib.sha256(payload.encode()).hexdigest()
