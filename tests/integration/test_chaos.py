"""Chaos: four real daemons (three in the plan, a spare) on a machine whose every core runs a
busy loop; a GGUF model pulled on one node and loaded with that node at a chosen place in the
chain; two different entry nodes stream greedy answers at once; a stage that is not the
importer gets SIGKILL mid-stream. Both streams complete (HTTP 200, no error line) with the
text of the undisturbed run, and the dead node is out of the new plan. The same runs over
network namespaces with 5 ms delay, 1 % loss and 100 Mbit/s on every link when run as
root: tc netem where the kernel has it, else node/testing/impair.py's userspace bridge. The
trial itself is node/testing/chaos.py's ``journey`` (also what scripts/bench_chaos.py
repeats)."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from node.testing.chaos import ChaosModel, TrialResult, cpu_hog, journey, prepare_model
from node.testing.netns import impairment_unusable_reason

pytestmark = pytest.mark.slow

TRIAL_TIMEOUT = 240.0  # the journey's own bound; pytest's is above it, so a failure says what failed


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> ChaosModel:
    """The tiny model as a Q8_0 GGUF (6 layers, hidden 64), what each node lends, its ranges."""
    return prepare_model(tmp_path_factory.mktemp("chaos-model"), "tiny", num_predict=120)


def _check(res: TrialResult) -> None:
    said = "\n".join([*res.errors, *res.notes, *res.log_notes]) or "(nothing)"
    context = (f"importer {res.importer} at {res.position}, victim {res.victim} (stage {res.victim_position}), "
               f"entries {res.entries}, spare {res.spare}; plan {res.plan_before} -> {res.plan_after}; "
               f"logs under {res.root}\n{said}")
    print(f"pauses {[s.pause_s for s in res.streams]} s, re-planned in {res.replan_s} s, links shaped by "
          f"{res.shaping}; {context}")  # with -s
    assert [s.status for s in res.streams] == [200, 200], context
    assert res.completed, context
    assert res.killed_mid_stream, context
    assert res.identical, context
    assert res.dead_out_of_plan, context
    assert not res.errors, context


def test_the_cpu_hog_busies_every_core_and_always_goes() -> None:
    with pytest.raises(RuntimeError), cpu_hog(2) as pids:
        assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)
        assert sum(psutil.Process(p).cpu_percent(0.5) for p in pids) > 50  # busy, not sleeping
        raise RuntimeError("the block fails")
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)


@pytest.mark.timeout(TRIAL_TIMEOUT + 60)
def test_a_stage_killed_on_a_busy_machine_costs_no_answer(model: ChaosModel, tmp_path: Path) -> None:
    # The importer at the end of the chain, a middle stage dies, the spare fetches its pieces.
    with cpu_hog():
        res = journey(tmp_path / "trial", model, position=2, victim_position=1, spare_holds=False, seed=7,
                      timeout=TRIAL_TIMEOUT)
    _check(res)


@pytest.mark.netns
@pytest.mark.timeout(TRIAL_TIMEOUT + 60)
def test_the_same_over_impaired_links(model: ChaosModel, tmp_path: Path) -> None:
    reason = impairment_unusable_reason()
    if reason is not None:
        pytest.skip(reason)
    # The importer at the head, the spare already holds the model.
    with cpu_hog():
        res = journey(tmp_path / "trial", model, position=0, spare_holds=True, seed=11, netns=True,
                      timeout=TRIAL_TIMEOUT)
    assert res.netns
    _check(res)
