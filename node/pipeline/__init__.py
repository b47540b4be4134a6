"""Distributed generation. The stage side: worker (this node's stages, leases, steps) and stage
(one partition's sessions and batching). The driver side: models (the models this node
drives: adopt the cluster's plan or make one, leases, recovery), session (one generation),
plans (plan records in the DHT), views (ps from the directory), failures (marks that
expire). Pure decisions: planner and cost."""
