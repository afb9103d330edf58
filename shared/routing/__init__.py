"""Routing policies behind one interface (``policy.Policy``), one file each (``docs/routing.md``).

``kleinfarm`` (``affinity.py``) is the farm's own; the others are baselines the simulator
(``kleinfarm bench routing``) runs against it, and the farm's dispatcher can apply instead
(``KLEINFARM_ROUTING_POLICY``).
"""

from __future__ import annotations

from kleinfarm.shared.routing.affinity import AffinityPolicy, Owners, Take, choose_route, desired_holders
from kleinfarm.shared.routing.cache_aware import CacheAwarePolicy
from kleinfarm.shared.routing.consistent_hash import ConsistentHashPolicy
from kleinfarm.shared.routing.least_loaded import LeastLoadedPolicy
from kleinfarm.shared.routing.pending import PendingIndex
from kleinfarm.shared.routing.policy import Decision, PendingJob, PerJobPolicy, Policy, Round, WorkerState
from kleinfarm.shared.routing.round_robin import RoundRobinPolicy

# In the order the simulator reports them: the baselines, then ours.
POLICIES: dict[str, type[Policy]] = {
    policy.name: policy
    for policy in (RoundRobinPolicy, LeastLoadedPolicy, CacheAwarePolicy, ConsistentHashPolicy, AffinityPolicy)
}


def policy_by_name(name: str) -> Policy:
    """A fresh policy (its state starts empty) by its ``name``."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; known: {', '.join(POLICIES)}") from None


__all__ = [
    "POLICIES",
    "AffinityPolicy",
    "CacheAwarePolicy",
    "ConsistentHashPolicy",
    "Decision",
    "LeastLoadedPolicy",
    "Owners",
    "PendingIndex",
    "PendingJob",
    "PerJobPolicy",
    "Policy",
    "Round",
    "RoundRobinPolicy",
    "Take",
    "WorkerState",
    "choose_route",
    "desired_holders",
    "policy_by_name",
]
