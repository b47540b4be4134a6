"""The user-facing surfaces against one shared three-node cluster (a package, so that
the cluster is torn down when these tests end, not at the end of the whole run)."""
