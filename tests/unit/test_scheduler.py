"""The batcher as a pure class: fake clock, fake workers, no sleeps, no processes."""
from __future__ import annotations

import dataclasses

import pytest

from fakes import FakeClock
from service import errors
from service.engine.scheduler import QueueItem, Scheduler, WorkerLoad
from service.types import BatchSettings, Priority, Protocol

IDLE = [WorkerLoad(worker_id=0)]


def make(clock: FakeClock, **batch) -> Scheduler:
    return Scheduler(BatchSettings(**batch), clock)


def item(clock: FakeClock, n: int, *, timeout_s: float = 30.0, protocol: Protocol = Protocol.REST) -> QueueItem:
    return QueueItem(item_id=n, request_id=f"r{n}", protocol=protocol, enqueued_at=clock(),
                     deadline=clock() + timeout_s, payload=f"image-{n}")


def ids(dispatch) -> list[int]:
    return [i.item_id for i in dispatch.batch.items]


def test_batch_is_capped_at_max_batch_size_in_fifo_order():
    clock = FakeClock()
    s = make(clock, max_batch_size=4)
    for n in range(10):
        s.add(item(clock, n))
    assert ids(s.next_batch(clock(), IDLE)) == [0, 1, 2, 3]
    assert ids(s.next_batch(clock(), IDLE)) == [4, 5, 6, 7]
    assert ids(s.next_batch(clock(), IDLE)) == [8, 9]
    assert s.next_batch(clock(), IDLE) is None
    assert s.depth == 0


def test_zero_delay_dispatches_a_lone_request_at_once():
    clock = FakeClock()
    s = make(clock, max_batch_size=8, max_batch_delay_ms=0)
    s.add(item(clock, 1))
    dispatch = s.next_batch(clock(), IDLE)
    assert dispatch is not None and ids(dispatch) == [1]
    assert dispatch.dispatched_at == clock()


def test_nothing_is_dispatched_without_an_idle_worker():
    clock = FakeClock()
    s = make(clock)
    s.add(item(clock, 1))
    assert s.next_batch(clock(), []) is None
    assert s.depth == 1


def test_delay_waits_for_a_fuller_batch_but_never_past_the_delay():
    clock = FakeClock()
    s = make(clock, max_batch_size=4, max_batch_delay_ms=50)
    s.add(item(clock, 1))
    assert s.next_batch(clock(), IDLE) is None
    assert s.wake_at(clock()) == pytest.approx(clock() + 0.050)
    clock.advance(0.030)
    s.add(item(clock, 2))
    assert s.next_batch(clock(), IDLE) is None  # the oldest has waited 30 of 50 ms
    assert s.wake_at(clock()) == pytest.approx(clock() + 0.020)  # measured from the oldest, not the newest
    clock.advance(0.020)
    assert ids(s.next_batch(clock(), IDLE)) == [1, 2]


def test_delay_is_cut_short_by_a_full_batch():
    clock = FakeClock()
    s = make(clock, max_batch_size=3, max_batch_delay_ms=1000)
    for n in range(3):
        s.add(item(clock, n))
    assert ids(s.next_batch(clock(), IDLE)) == [0, 1, 2]


def test_full_queue_raises_overloaded_with_retry_after_immediately():
    clock = FakeClock()
    s = make(clock, max_queue_size=3)
    for n in range(3):
        s.add(item(clock, n))
    with pytest.raises(errors.Overloaded) as err:
        s.add(item(clock, 99))
    assert err.value.retry_after_s is not None and err.value.retry_after_s >= 1
    assert s.depth == 3


def test_multi_image_request_is_admitted_whole_or_not_at_all():
    clock = FakeClock()
    s = make(clock, max_queue_size=4)
    s.add_all([item(clock, n) for n in range(3)])
    with pytest.raises(errors.Overloaded):
        s.add_all([item(clock, 10), item(clock, 11)])
    assert s.depth == 3


def test_expired_items_are_returned_by_expire_and_never_dispatched():
    clock = FakeClock()
    s = make(clock, max_batch_size=8)
    s.add(item(clock, 1, timeout_s=0.1))
    s.add(item(clock, 2, timeout_s=10))
    s.add(item(clock, 3, timeout_s=0.1))
    assert s.wake_at(clock()) == pytest.approx(clock() + 0.1)
    clock.advance(0.2)
    dispatch = s.next_batch(clock(), IDLE)  # even when next_batch runs before expire
    assert ids(dispatch) == [2]
    assert [i.item_id for i in s.expire(clock())] == [1, 3]
    assert s.expire(clock()) == []
    assert s.depth == 0


def test_only_expired_items_left_gives_no_batch():
    clock = FakeClock()
    s = make(clock)
    s.add(item(clock, 1, timeout_s=0.1))
    clock.advance(1)
    assert s.next_batch(clock(), IDLE) is None
    assert [i.item_id for i in s.expire()] == [1]  # `now` defaults to the injected clock


def test_least_loaded_idle_worker_gets_the_batch():
    clock = FakeClock()
    s = make(clock, max_batch_size=1)
    workers = [WorkerLoad(0, in_flight=3), WorkerLoad(1, in_flight=1), WorkerLoad(2, in_flight=2)]
    s.add(item(clock, 1))
    assert s.next_batch(clock(), workers).worker_id == 1


def test_ties_go_to_the_worker_that_waited_longest():
    clock = FakeClock()
    s = make(clock, max_batch_size=1)
    workers = [WorkerLoad(0, last_dispatch_at=5.0), WorkerLoad(1, last_dispatch_at=2.0), WorkerLoad(2, last_dispatch_at=9.0)]
    s.add(item(clock, 1))
    assert s.next_batch(clock(), workers).worker_id == 1


def test_settings_changed_at_runtime_apply_to_the_next_decision():
    clock = FakeClock()
    s = make(clock, max_batch_size=2, max_queue_size=3, max_batch_delay_ms=0)
    for n in range(3):
        s.add(item(clock, n))
    s.settings = dataclasses.replace(s.settings, max_batch_size=8, max_queue_size=5, max_batch_delay_ms=100)
    s.add(item(clock, 3))
    s.add(item(clock, 4))
    with pytest.raises(errors.Overloaded):
        s.add(item(clock, 5))
    assert s.next_batch(clock(), IDLE) is None  # now holding for company
    clock.advance(0.1)
    assert ids(s.next_batch(clock(), IDLE)) == [0, 1, 2, 3, 4]


def test_requeued_items_go_first_and_bypass_the_size_cap():
    clock = FakeClock()
    s = make(clock, max_batch_size=2, max_queue_size=2)
    first = [item(clock, 1), item(clock, 2)]
    s.add_all(first)
    dispatch = s.next_batch(clock(), IDLE)
    s.add_all([item(clock, 3), item(clock, 4)])
    s.requeue(dispatch.batch.items)  # the worker died under them
    assert s.depth == 4
    assert ids(s.next_batch(clock(), IDLE)) == [1, 2]


def test_wake_at_is_none_when_empty_and_ignores_an_elapsed_hold():
    clock = FakeClock()
    s = make(clock, max_batch_size=4, max_batch_delay_ms=10)
    assert s.wake_at(clock()) is None
    s.add(item(clock, 1, timeout_s=5))
    clock.advance(1)  # the hold ended; no worker was idle
    assert s.wake_at(clock()) == pytest.approx(clock() + 4)


def test_batch_reports_its_protocol_mix():
    clock = FakeClock()
    s = make(clock, max_batch_size=4)
    s.add(item(clock, 1, protocol=Protocol.REST))
    s.add(item(clock, 2, protocol=Protocol.GRPC))
    assert s.next_batch(clock(), IDLE).batch.protocol_mix == "mixed"
    s.add(item(clock, 3, protocol=Protocol.GRPC))
    assert s.next_batch(clock(), IDLE).batch.protocol_mix == "grpc"


def test_retry_after_grows_with_observed_batch_time():
    clock = FakeClock()
    s = make(clock, max_batch_size=1, max_queue_size=10)
    for n in range(10):
        s.add(item(clock, n))
    dispatch = s.next_batch(clock(), IDLE)
    for _ in range(20):
        s.complete(dispatch, clock() + 2.0)  # each batch took 2 s
    with pytest.raises(errors.Overloaded) as err:
        s.add_all([item(clock, 50), item(clock, 51)])
    assert err.value.retry_after_s >= 10


def low(clock: FakeClock, n: int, *, timeout_s: float = 30.0) -> QueueItem:
    return dataclasses.replace(item(clock, n, timeout_s=timeout_s), priority=Priority.LOW)


def test_normal_items_go_before_low_ones_queued_earlier():
    clock = FakeClock()
    s = make(clock, max_batch_size=4)
    for n in range(6):
        s.add(low(clock, 100 + n))  # a background job has filled the queue
    clock.advance(0.5)
    s.add(item(clock, 1))
    s.add(item(clock, 2))
    assert s.depth == 8 and s.low_depth == 6
    assert ids(s.next_batch(clock(), IDLE)) == [1, 2]  # interactive first, and alone
    s.add(item(clock, 3))
    assert ids(s.next_batch(clock(), IDLE)) == [3]
    assert ids(s.next_batch(clock(), IDLE)) == [100]  # then the job, in small batches (below)


def test_while_interactive_traffic_is_recent_job_items_go_one_batch_of_one_at_a_time():
    clock = FakeClock()
    s = make(clock, max_batch_size=8)
    for n in range(20):
        s.add(low(clock, 100 + n))
    assert ids(s.next_batch(clock(), IDLE)) == list(range(100, 108))  # no interactive traffic: full batches
    s.add(item(clock, 1))
    assert ids(s.next_batch(clock(), IDLE)) == [1]  # no job image rides along with a request
    # A request arriving now waits for at most one job image, not a batch of eight.
    assert ids(s.next_batch(clock(), IDLE)) == [108]
    clock.advance(s.busy_window_s - 0.01)
    assert ids(s.next_batch(clock(), IDLE)) == [109]
    clock.advance(0.01)  # the interactive client went quiet: the job gets full batches again
    assert ids(s.next_batch(clock(), IDLE)) == list(range(110, 118))


def test_the_job_batch_size_while_busy_is_a_setting_of_the_scheduler():
    clock = FakeClock()
    s = dataclasses.replace(make(clock, max_batch_size=8), low_batch_when_busy=3)
    for n in range(6):
        s.add(low(clock, 100 + n))
    s.add(item(clock, 1))
    assert ids(s.next_batch(clock(), IDLE)) == [1]
    assert ids(s.next_batch(clock(), IDLE)) == [100, 101, 102]
    clock.advance(s.busy_window_s)
    s.requeue([item(clock, 7)])  # a worker died under it: admitted before, so not new traffic
    assert ids(s.next_batch(clock(), IDLE)) == [7, 103, 104, 105]


def test_low_items_share_the_size_cap_and_expire_like_others():
    clock = FakeClock()
    s = make(clock, max_batch_size=2, max_queue_size=3)
    s.add(low(clock, 100, timeout_s=1.0))
    s.add(low(clock, 101))
    s.add(item(clock, 1))
    with pytest.raises(errors.Overloaded):
        s.add(item(clock, 2))
    assert s.wake_at(clock()) == pytest.approx(clock() + 1.0)  # a LOW deadline wakes the dispatcher too
    clock.advance(1.0)
    assert [i.item_id for i in s.expire(clock())] == [100]
    assert ids(s.next_batch(clock(), IDLE)) == [1]
    assert ids(s.next_batch(clock(), IDLE)) == [101]


def test_low_items_count_for_the_batch_delay_and_requeue_to_their_own_lane():
    clock = FakeClock()
    s = make(clock, max_batch_size=4, max_batch_delay_ms=50)
    s.add(low(clock, 100))
    clock.advance(0.030)
    s.add(item(clock, 1))
    assert s.next_batch(clock(), IDLE) is None
    assert s.wake_at(clock()) == pytest.approx(clock() + 0.020)  # held from the oldest item, a LOW one
    clock.advance(0.020)
    clock.advance(s.busy_window_s)  # the request is no longer recent: the LOW item may ride along
    dispatch = s.next_batch(clock(), IDLE)
    assert ids(dispatch) == [1, 100]
    s.requeue(dispatch.batch.items)  # the worker died under them
    assert s.low_depth == 1
    assert ids(s.next_batch(clock(), IDLE)) == [1, 100]


# --- shape groups -------------------------------------------------------------------------------

def keyed(clock: FakeClock, n: int, key, *, timeout_s: float = 30.0, priority: Priority = Priority.NORMAL) -> QueueItem:
    return dataclasses.replace(item(clock, n, timeout_s=timeout_s), shape_key=key, priority=priority)


def test_items_of_the_oldest_items_shape_are_batched_together():
    clock = FakeClock()
    s = make(clock, max_batch_size=3)
    for n, key in enumerate(["a", "b", "a", "c", "b", "a", "b"]):
        s.add(keyed(clock, n, key))
    assert ids(s.next_batch(clock(), IDLE)) == [0, 2, 5]  # every "a", led by the oldest item
    assert ids(s.next_batch(clock(), IDLE)) == [1, 4, 6]
    assert ids(s.next_batch(clock(), IDLE)) == [3]


def test_a_batch_fills_with_other_shapes_by_age_once_the_oldest_shape_runs_out():
    clock = FakeClock()
    s = make(clock, max_batch_size=4)
    for n, key in enumerate(["a", "b", "c", "a", "c"]):
        s.add(keyed(clock, n, key))
    # "a" first (0, 3), then the next-oldest group "b" (1), then one of "c" (2); 4 waits for the next batch
    assert ids(s.next_batch(clock(), IDLE)) == [0, 3, 1, 2]
    assert ids(s.next_batch(clock(), IDLE)) == [4]


def test_items_without_a_shape_key_never_group_and_alone_keep_fifo_order():
    clock = FakeClock()
    s = make(clock, max_batch_size=3)
    for n, key in enumerate([None, "a", None, "a"]):
        s.add(keyed(clock, n, key))
    assert ids(s.next_batch(clock(), IDLE)) == [0, 1, 3]  # the "a" pair ranks by its older member
    assert ids(s.next_batch(clock(), IDLE)) == [2]
    for n in range(4, 9):
        s.add(keyed(clock, n, None))
    assert ids(s.next_batch(clock(), IDLE)) == [4, 5, 6]
    assert ids(s.next_batch(clock(), IDLE)) == [7, 8]


def test_grouping_looks_only_a_few_batches_ahead_so_older_items_are_not_passed_over_for_long():
    from service.engine.scheduler import SHAPE_LOOKAHEAD

    size = 2
    window = size * SHAPE_LOOKAHEAD
    for gap, grouped in ((window - 2, True), (window - 1, False)):
        clock = FakeClock()
        s = make(clock, max_batch_size=size)
        keys = ["a"] + ["b"] * gap + ["a"]  # the second "a" just inside, then just outside the window
        for n, key in enumerate(keys):
            s.add(keyed(clock, n, key))
        assert ids(s.next_batch(clock(), IDLE)) == ([0, len(keys) - 1] if grouped else [0, 1])
        rest = []
        while (d := s.next_batch(clock(), IDLE)) is not None:
            rest += ids(d)
        assert len(rest) == len(keys) - 2 and s.depth == 0


def test_expired_items_are_skipped_by_grouping_and_left_for_expire():
    clock = FakeClock()
    s = make(clock, max_batch_size=4)
    s.add(keyed(clock, 0, "a", timeout_s=1.0))
    s.add(keyed(clock, 1, "b"))
    s.add(keyed(clock, 2, "a"))
    clock.advance(2.0)
    assert ids(s.next_batch(clock(), IDLE)) == [1, 2]
    assert [i.item_id for i in s.expire(clock())] == [0]


def test_low_priority_items_join_the_shapes_already_in_the_batch_first():
    clock = FakeClock()
    s = make(clock, max_batch_size=3)
    s.add(keyed(clock, 0, "a"))
    s.add(keyed(clock, 1, "b", priority=Priority.LOW))
    s.add(keyed(clock, 2, "a", priority=Priority.LOW))
    s.add(keyed(clock, 3, "c", priority=Priority.LOW))
    clock.advance(s.busy_window_s + 0.1)  # LOW items ride with NORMAL ones only once traffic is quiet
    assert ids(s.next_batch(clock(), IDLE)) == [0, 2, 1]
    assert ids(s.next_batch(clock(), IDLE)) == [3]


def test_while_busy_job_batches_rest_so_they_take_at_most_their_share_of_the_worker():
    clock = FakeClock()
    s = make(clock, max_batch_size=8)
    assert s.low_share_when_busy == 0.25
    for n in range(4):
        s.add(low(clock, 100 + n))
    s.add(item(clock, 1))
    first = s.next_batch(clock(), IDLE)
    s.complete(first, clock.advance(0.05))  # a request batch: no rest follows it
    job = s.next_batch(clock(), IDLE)
    assert ids(job) == [100]
    clock.advance(0.04)  # the job image ran 40 ms: the lane rests 3 x 40 ms
    s.complete(job, clock())
    assert s.next_batch(clock(), IDLE) is None
    assert s.wake_at(clock()) == pytest.approx(clock() + 0.12)
    s.add(item(clock, 2))  # requests never wait for the rest
    assert ids(s.next_batch(clock(), IDLE)) == [2]
    clock.advance(0.12)
    assert ids(s.next_batch(clock(), IDLE)) == [101]


def test_the_rest_ends_with_the_busy_window():
    clock = FakeClock()
    s = dataclasses.replace(make(clock, max_batch_size=8), low_share_when_busy=0.01)
    for n in range(4):
        s.add(low(clock, 100 + n))
    s.add(item(clock, 1))
    request_at = clock()
    assert ids(s.next_batch(clock(), IDLE)) == [1]
    job = s.next_batch(clock(), IDLE)
    clock.advance(1.0)
    s.complete(job, clock())  # a 1 s job batch at 1%: 99 s of rest, but only while busy
    assert s.next_batch(clock(), IDLE) is None
    assert s.wake_at(clock()) == pytest.approx(request_at + s.busy_window_s)
    clock.advance(s.busy_window_s - 1.0)
    assert ids(s.next_batch(clock(), IDLE)) == [101, 102, 103]  # quiet again: full batches, no rest
