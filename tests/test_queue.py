"""The runner's one FIFO queue: order, places, the cap, cancel of a waiting job, and the frozen Studio."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from masuka.core.runner import QueueFull
from masuka.studio import Caller


@pytest.fixture
def gate(studio):
    """A first job that holds the runner at its first step until released."""
    release, started = threading.Event(), threading.Event()

    def hold(done, total):
        started.set()
        assert release.wait(60)

    ticket = studio.submit(studio.validate(prompt="holder", seed=1, steps=2), Caller(), on_step=hold)
    assert started.wait(60)
    yield ticket, release
    release.set()


def test_jobs_run_in_the_order_they_came_with_their_places(studio, gate):
    holder, release = gate
    tickets = [studio.submit(studio.validate(prompt=f"job {i}", seed=i, steps=1), Caller(user=f"u{i}")) for i in range(3)]
    assert studio.position(holder.job_id) == 0
    assert [studio.position(t.job_id) for t in tickets] == [1, 2, 3]
    assert [r["status"] for r in (studio.job(t.job_id) for t in tickets)] == ["queued"] * 3
    release.set()
    results = [studio.outcome(t) for t in tickets]
    assert all(r.status == "completed" for r in results)
    started = [studio.job(t.job_id)["started_at"] for t in tickets]
    assert started == sorted(started)  # first in, first out
    assert studio.position(tickets[0].job_id) is None


def test_a_full_queue_refuses_for_every_way_in_and_names_the_limit(studio, gate):
    waiting = [studio.submit(studio.validate(prompt="w", steps=1), Caller()) for _ in range(studio.runner.queue_size)]
    with pytest.raises(QueueFull, match=f"the limit is {studio.runner.queue_size}"):
        studio.submit(studio.validate(prompt="one too many", steps=1), Caller())
    assert studio.queue_length() == len(waiting)


def test_cancelling_a_waiting_job_ends_it_and_moves_the_others_up(studio, gate):
    first = studio.submit(studio.validate(prompt="a", steps=1), Caller())
    second = studio.submit(studio.validate(prompt="b", steps=1), Caller())
    answer = studio.cancel(first.job_id, Caller())
    assert answer == {"job_id": first.job_id, "cancelled": True, "status": "cancelled"}
    assert first.done.is_set() and studio.outcome(first).status == "cancelled"
    assert studio.position(second.job_id) == 1
    gate[1].set()
    assert studio.outcome(second).status == "completed"


def test_another_login_cannot_cancel_my_job(studio, gate):
    mine = studio.submit(studio.validate(prompt="mine", steps=1), Caller(user="alice"))
    with pytest.raises(ValueError, match="belongs to another user"):
        studio.cancel(mine.job_id, Caller(user="mallory"))
    assert studio.position(mine.job_id) == 1


def test_the_studio_is_frozen(studio):
    for field in dataclasses.fields(studio):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(studio, field.name, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        studio.rate_limiter_override = object()  # nothing is bolted on after construction


def test_a_session_id_alone_cancels_nothing_of_another_login(studio, gate):
    """A stranger who learnt Alice's browser session id posts the page's cancel with it."""
    alice = Caller(user="alice", session="s-alice")
    mine = studio.submit(studio.validate(prompt="alice's", steps=1), alice)
    assert studio.cancel_mine(Caller(user="mallory", session="s-alice")) is None
    assert studio.position(mine.job_id) == 1
    assert studio.cancel_mine(alice) == mine.job_id
    assert studio.job(mine.job_id)["status"] == "cancelled"
