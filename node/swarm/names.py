"""Which model a cluster name stands for when members disagree.

Any member may publish ``name/<name>`` for a model it holds, and an insider can publish a
name that another member's model already has (issued in the future, so that "newest wins"
would hand every user its model and chat template). A name therefore keeps the model this
node first saw it stand for; when a node sees two claims at once and knew neither, the name
is ambiguous and the request names both models (use the digest, or `nodectl cp` to name one
here). A conflict is logged once per node, never resolved silently. Names in this node's own
store win over the cluster's (the caller asks the store first).
"""

from __future__ import annotations

from collections.abc import Mapping, Set

import structlog

__all__ = ["NameBook", "NameConflict"]

log = structlog.get_logger("node.swarm")

MAX_NAMES = 4096  # names remembered (oldest forgotten first)


class NameConflict(LookupError):
    """Two or more models claim a name and this node knows no first one."""

    def __init__(self, name: str, claims: Mapping[str, Set[str]]) -> None:
        self.name = name
        self.claims = {m: sorted(p) for m, p in claims.items()}
        listed = "; ".join(f"{m[:12]} (published by {', '.join(p[:12] for p in pubs[:3])})"
                           for m, pubs in sorted(self.claims.items()))
        super().__init__(f"the name {name!r} stands for {len(claims)} different models in the cluster: {listed}; "
                         "ask for one by its digest, or name it here with `nodectl cp DIGEST NAME`")


class NameBook:
    def __init__(self, limit: int = MAX_NAMES) -> None:
        self.limit = limit
        self._first: dict[str, str] = {}
        self._logged: set[tuple[str, ...]] = set()

    def first(self, name: str) -> str | None:
        return self._first.get(name)

    def choose(self, name: str, claims: Mapping[str, Set[str]]) -> str | None:
        """The model ``name`` stands for given the cluster's claims (model id -> publishers)."""
        if not claims:
            return None
        if len(claims) == 1:
            (model_id,) = claims
            if self._first.get(name) != model_id:  # new, or the old model's name went away
                self._remember(name, model_id)
            return model_id
        known = self._first.get(name)
        key = (name, *sorted(claims))
        if key not in self._logged:
            self._logged.add(key)
            if len(self._logged) > self.limit:
                self._logged.clear()
            log.warning("name_conflict", name=name, kept=(known or "")[:12] or None,
                        models={m[:12]: sorted(p)[:3] for m, p in claims.items()})
        if known in claims:
            return known
        raise NameConflict(name, claims)

    def _remember(self, name: str, model_id: str) -> None:
        self._first.pop(name, None)
        self._first[name] = model_id
        while len(self._first) > self.limit:
            del self._first[next(iter(self._first))]
