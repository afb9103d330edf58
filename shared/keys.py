"""Every Redis key the farm writes, in one place: what it holds, who writes it, how long it lives.

Python builds every key here and passes it to the Lua scripts as ``KEYS``; no script or module
builds a key of its own. ``docs/redis.md`` walks through the same schema with the life of a job.
``job_id`` is a job's farm-wide id, ``<campaign_id>/<local_id>``; ``local_id`` is its id within
the campaign (the campaign file's ``id``, or ``job-NNN``).

Keys owned by libraries, named here but written by them: Celery/kombu's queues (``DEFAULT_QUEUE``,
``CONTROL_QUEUE``, ``worker_queue``) with kombu's ``unacked*`` hashes, and redbeat's entries under
``REDBEAT_PREFIX``.
"""

from __future__ import annotations

PREFIX = "kf"

# -- the queue -------------------------------------------------------------------------------------
# zset job_id -> score (priority first, then submission order). Written by submit, requeue, retry
# and resume; read and emptied by the dispatcher, which removes a job when it assigns it. Lives
# while the job waits.
PENDING = f"{PREFIX}:pending"
# list of reasons to look at the queue now (a submission, a freed slot, a resume). Pushed by
# producers and workers; popped and cleared by the dispatcher leader each round.
WAKE = f"{PREFIX}:wake"
# zset job_id -> when it may run again (Redis server time, seconds): jobs waiting out a backoff
# after a transient fault. Added by the backoff move (transition.lua); the dispatcher leader moves
# the ready ones to PENDING (or the campaign's paused zset) under their own score (promote.lua);
# cancel removes them. Lives while the job waits.
DELAYED = f"{PREFIX}:delayed"
# set of job_ids in state assigned or running: the jobs some worker is supposed to hold. Kept by
# transition.lua at every move; read by the dispatcher leader's reconciler, which returns to the
# queue a job no live worker holds. Lives while the job is with a worker.
ACTIVE = f"{PREFIX}:active"
# counter: submission sequence, so jobs of one priority keep FIFO order. Lives for ever.
SEQUENCE = f"{PREFIX}:seq"
# hash job_id -> "route|work_s|build_s|priority|width|height|references": what routing needs of a job
# (its set, its cost, which cards can run it), read in one HMGET by
# the dispatcher. Written at submit. Not yet pruned when a campaign ends.
ROUTING = f"{PREFIX}:routing"
# string lock: which worker process's dispatcher leads. Held with a TTL of a few ticks.
DISPATCHER_LOCK = f"{PREFIX}:dispatcher:lock"
# Celery queue (a kombu list) nothing is routed to: tasks always name their queue.
DEFAULT_QUEUE = f"{PREFIX}.default"
# Celery queue (a kombu list) of the schedule task that beat fires; served by ``kleinfarm beat``.
CONTROL_QUEUE = f"{PREFIX}.control"

# -- campaigns ---------------------------------------------------------------------------------------
# zset campaign_id -> creation time. Written at submit. Lives for ever.
CAMPAIGNS = f"{PREFIX}:campaigns"


def campaign(campaign_id: str) -> str:
    """hash: name, output_prefix, priority, error_limit, created, total, open, n_<state> counters,
    changed_at, cancel_requested, paused, failed_reason, manifest_key, waiting (set and cleared by
    the dispatcher: why jobs wait that no live worker can run), model (the ``id@revision`` it runs
    on, pinned by the dispatcher or its first worker). Written at submit, counters only by
    transition.lua. Lives for ever."""
    return f"{PREFIX}:campaign:{campaign_id}"


def campaign_jobs(campaign_id: str) -> str:
    """list of local_ids in submission order. Written at submit. Lives for ever."""
    return f"{campaign(campaign_id)}:jobs"


def campaign_paused(campaign_id: str) -> str:
    """zset job_id -> score: the queued jobs of a paused campaign, out of the dispatcher's sight.
    Filled by pause and by a requeue while paused; emptied by resume and cancel."""
    return f"{campaign(campaign_id)}:paused"


def campaign_events(campaign_id: str) -> str:
    """pub/sub channel: every job transition of the campaign (the new state) and "manifest".
    Published by transition.lua and the manifest writer; ``wait()`` listens. Holds nothing."""
    return f"{campaign(campaign_id)}:events"


def campaign_blocked(campaign_id: str) -> str:
    """set of worker identities kept off the campaign (the blocklist). Written by a worker whose
    own errors failed too many of its jobs; read by the dispatcher; deleted by ``retry --failed``."""
    return f"{campaign(campaign_id)}:blocked"


def campaign_worker_failures(campaign_id: str) -> str:
    """hash worker identity -> failures it caused in the campaign (not bad input, not transient
    faults). Written by workers; deleted by ``retry --failed``."""
    return f"{campaign(campaign_id)}:worker-failures"


# -- jobs ----------------------------------------------------------------------------------------------
def job(job_id: str) -> str:
    """hash: spec (JSON), state, attempt, worker, score, kind, seed, width, height, route;
    then refset, kv, key, error, timings, started, finished, progress as the job runs;
    ``transient_failures`` and ``transient_error`` (faults retried with backoff) and ``lost`` (times
    its worker was lost while it ran). Written at submit; state, attempt and worker only by
    transition.lua. Lives for ever."""
    return f"{PREFIX}:job:{job_id}"


def job_id(campaign_id: str, local_id: str) -> str:
    """The farm-wide id of a job."""
    return f"{campaign_id}/{local_id}"


def campaign_of(job_id: str) -> str:
    return job_id.split("/", 1)[0]


def local_id_of(job_id: str) -> str:
    return job_id.split("/", 1)[1]


# -- workers ---------------------------------------------------------------------------------------------
# zset worker_id -> time of its last heartbeat, by the Redis server's clock (``TIME``), so a
# machine whose own clock is off is neither lapsed early nor kept alive late. Written by each
# worker's heartbeat; a worker older than the lapse is retired by the dispatcher leader.
WORKERS = f"{PREFIX}:workers"
# hash identity (host and card) -> the worker_id serving it now. Written by heartbeats, so a
# restarted card retires its previous process at once.
IDENTITIES = f"{PREFIX}:identities"
# set of identities an operator drained (``kleinfarm worker drain``): such a worker reports no free
# slot, so the dispatcher hands it nothing, and gives back a job that reaches it; kept across its
# restarts until ``kleinfarm worker undrain``.
DRAINING = f"{PREFIX}:draining"
# hash "retired_<cause>" -> workers retired for it since the farm began (lapsed heartbeat, restart
# under the same identity, a clean stop): what the exporter shows as lapses. Lives for ever.
RETIREMENTS = f"{PREFIX}:retirements"


def worker(worker_id: str) -> str:
    """hash: ``report`` (the worker's JSON ``WorkerReport``), ``seen`` (Redis server time) and
    ``holding`` (JSON list of the job_ids whose task the process is running now, which the
    reconciler trusts over the assigned zset). Written by heartbeats; deleted when the worker is
    retired."""
    return f"{PREFIX}:worker:{worker_id}"


def worker_assigned(worker_id: str) -> str:
    """zset job_id -> estimated seconds: the jobs handed to the worker and not yet released.
    Added by the assign move, removed by the worker's release; deleted when it is retired."""
    return f"{worker(worker_id)}:assigned"


def worker_queue(worker_id: str) -> str:
    """The worker's own Celery queue (a kombu list): only the dispatcher publishes to it."""
    return f"{PREFIX}.w.{worker_id}"


def worker_queue_lists(worker_id: str) -> list[str]:
    """Every list kombu keeps for the worker's queue: the plain name and one per priority step."""
    queue = worker_queue(worker_id)
    return [queue, *(f"{queue}\x06\x16{step}" for step in (3, 6, 9))]


# -- schedules ---------------------------------------------------------------------------------------------
# hash schedule name -> Schedule JSON. Written by ``kleinfarm schedule add``; lives until removed.
SCHEDULES = f"{PREFIX}:schedules"
# key prefix of celery-redbeat's own entries (when each schedule fires next).
REDBEAT_PREFIX = f"{PREFIX}:redbeat:"


def schedule_runs(name: str) -> str:
    """list of JSON run summaries (photos, submitted, already edited, in flight, campaign)."""
    return f"{PREFIX}:schedule:{name}:runs"


def schedule_campaigns(name: str) -> str:
    """list of the campaign ids the schedule submitted."""
    return f"{PREFIX}:schedule:{name}:campaigns"


def schedule_done(name: str) -> str:
    """set of edit keys (photo content + edit settings) already edited successfully."""
    return f"{PREFIX}:schedule:{name}:done"
