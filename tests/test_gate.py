"""gate.py: ready requests wait while others are loading and enter together; a call that ends early takes its own
away and stops being waited for."""
from types import SimpleNamespace

from idefics.gate import Gate


def gate(group: int = 64):
    entered = []
    return Gate(lambda requests, sinks: entered.append([(r.id, s) for r, s in zip(requests, sinks)]), group), entered


def request(id):
    return SimpleNamespace(id=id)


def test_ready_requests_wait_for_those_still_loading_then_enter_together():
    g, entered = gate()
    for _ in range(3):
        g.started()
    assert g.loaded(request(1), "a") and g.loaded(request(2), "b")  # waiting: one prompt is still loading
    assert entered == []
    assert not g.loaded()  # the last one failed: nothing is loading, the two enter in one submit
    assert entered == [[(1, "a"), (2, "b")]]


def test_a_full_group_enters_without_waiting_for_the_rest():
    g, entered = gate(group=2)
    for _ in range(5):
        g.started()
    g.loaded(request(1), "a")
    assert not g.loaded(request(2), "a")  # the group is full: in
    assert entered == [[(1, "a"), (2, "a")]] and g.loading == 3


def test_a_call_that_leaves_early_takes_its_waiting_requests_and_is_no_longer_waited_for():
    g, entered = gate()
    for _ in range(3):  # call A: requests 1 and 2 (its prompt still loading); call B: request 3
        g.started()
    g.loaded(request(1), "A")
    g.loaded(request(3), "B")
    assert entered == []
    # A ends (interrupted) with request 1 waiting and one prompt loading; request 2 never came
    assert g.leave({1}, loading=1) == set()  # none of A's had entered: nothing to abort
    assert entered == [[(3, "B")]]  # B's request no longer waits for A's prompt
    g.started()
    assert not g.loaded(request(4), "C")  # nothing else loading: in at once
    assert entered[-1] == [(4, "C")]
    assert g.leave({4}, loading=0) == {4}  # had entered: its call aborts it


def test_a_calls_thread_gets_only_the_outputs_that_end_its_requests():
    import queue

    from idefics.api import _Ends
    from idefics.scheduler import Output

    events = queue.SimpleQueue()
    ends = _Ends(events)
    for output in (Output(1, 5, "a"), Output(1, 6, "b"), Output(2, None, "", "error", error="bad"),
                   Output(1, 7, "c", "length")):
        ends.put(output)
    got = [events.get_nowait() for _ in range(events.qsize())]
    assert [(o.id, o.finish_reason) for o in got] == [(2, "error"), (1, "length")]
