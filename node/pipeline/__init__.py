"""Distributed generation: the planner, the stage worker, the session driver."""
