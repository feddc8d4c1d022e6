"""Ray: joining a cluster, placement groups, worker actors and the collective-call helper."""
