"""Farm-wide duties every worker process hosts beside rendering: the heartbeat that says what it
holds, and the dispatcher (one leader at a time) that applies the routing policy."""
