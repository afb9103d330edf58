"""The render engine: FLUX.2 [klein] denoising with reference K/V and prompt embeddings kept across jobs.

``engine.py`` runs the loop, ``plan.py`` decides per job how references go through it,
``kv_cache.py``/``prompt_cache.py`` hold what is reused, ``profiles.py`` lays a card's memory out,
``random_model.py`` builds random-weight pipelines for the tests and the benchmark. See ``docs/engine.md``.
"""

from kleinfarm.worker.engine.engine import CacheBudgets, RenderEngine
from kleinfarm.worker.engine.plan import ReferenceMode, ReferencePlan
from kleinfarm.worker.engine.results import ImageResult, LatentResult

__all__ = ["CacheBudgets", "ImageResult", "LatentResult", "ReferenceMode", "ReferencePlan", "RenderEngine"]
