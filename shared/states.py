"""Every state a job can be in, and every move between states: the farm's one state graph.

Each move is named for what causes it. Callers name a move, never a list of states: the
allowed sources and targets come from ``TRANSITIONS`` and are handed to the one Lua script that
changes a job's state (``lua/transition.lua``), which refuses anything else.

    pending --assign--> assigned --claim--> running --finish--> succeeded | failed | cancelled
       ^                  |  ^                 |
       |                  |  +--reissue--+     |
       +----requeue-------+------------------- +   (worker lost, below the attempt limit)
       +----recover-------+------------------- +   (no live worker holds it: its message or end was lost)
       +----backoff--------------------------- +   (a transient fault: back after a delay)
    failed <--abandon-- assigned | running         (worker lost too often)
    pending --cancel--> cancelled;  failed --retry--> pending
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class JobState(StrEnum):
    """Where a job is in its life; the last three are terminal."""

    PENDING = "pending"
    ASSIGNED = "assigned"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
# The counters a campaign keeps; an assigned job counts as pending (it has not started).
COUNTED_STATES = (JobState.PENDING, JobState.RUNNING, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)
# States in which a job belongs to a worker (it may be requeued when that worker is lost).
WITH_WORKER = frozenset({JobState.ASSIGNED, JobState.RUNNING})


class Move(StrEnum):
    """The causes of a state change."""

    ASSIGN = "assign"  # the dispatcher hands a pending job to a worker with a free slot
    REISSUE = "reissue"  # a new dispatcher leader re-sends an assigned job under a new attempt
    CLAIM = "claim"  # the worker starts the attempt it was handed
    FINISH = "finish"  # the worker records how its attempt ended
    REQUEUE = "requeue"  # the worker was lost: the job goes back to the queue
    ABANDON = "abandon"  # the worker was lost too often while rendering this job
    CANCEL = "cancel"  # the campaign was cancelled before the job started
    RETRY = "retry"  # an operator requeues a failed job
    # A transient fault (storage, network, Redis) ended the attempt: nobody is to blame, and the job
    # waits out a delay in ``keys.DELAYED`` before it is queued again.
    BACKOFF = "backoff"
    # The farm's record gives the job to a worker that does not hold it (the worker is gone, or the
    # job's message or its final move was lost): the reconciler puts it back in the queue.
    RECOVER = "recover"


@dataclass(frozen=True)
class Rule:
    """The states a move may start from and the states it may lead to."""

    sources: frozenset[JobState]
    targets: frozenset[JobState]


def _rule(sources: set[JobState], targets: set[JobState]) -> Rule:
    return Rule(frozenset(sources), frozenset(targets))


P, A, R = JobState.PENDING, JobState.ASSIGNED, JobState.RUNNING
S, F, C = JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED
TRANSITIONS: dict[Move, Rule] = {
    Move.ASSIGN: _rule({P}, {A}),
    Move.REISSUE: _rule({A}, {A}),
    Move.CLAIM: _rule({A}, {R}),
    Move.FINISH: _rule({R}, {S, F, C}),
    Move.REQUEUE: _rule({A, R}, {P}),
    Move.ABANDON: _rule({A, R}, {F}),
    Move.CANCEL: _rule({P}, {C}),
    Move.RETRY: _rule({F}, {P}),
    Move.BACKOFF: _rule({R}, {P}),
    Move.RECOVER: _rule({A, R}, {P}),
}


def rule_for(move: Move, target: JobState) -> Rule:
    """The rule of ``move``; a target the move cannot lead to is a programming error."""
    rule = TRANSITIONS[move]
    if target not in rule.targets:
        raise ValueError(f"{move} cannot lead to {target}: it leads to {sorted(rule.targets)}")
    return rule
