"""Static shard plans: every index lands exactly once, for any n >= 0 and size >= 1."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from hvdinfer.data.shard import ShardPlan


@given(n=st.integers(0, 5000), size=st.integers(1, 70), kind=st.sampled_from(["contiguous", "strided"]))
def test_every_index_lands_exactly_once(n, size, kind):
    plan = ShardPlan(n, size, kind)
    parts = [plan.indices(r) for r in range(size)]
    everything = np.concatenate(parts)
    assert len(everything) == n
    np.testing.assert_array_equal(np.sort(everything), np.arange(n))
    assert plan.counts() == [len(p) for p in parts]
    assert max(plan.counts()) == plan.max_count() or n == 0
    assert max(plan.counts()) - min(plan.counts()) <= 1  # balanced to one record


@given(n=st.integers(0, 1000), size=st.integers(1, 40))
def test_contiguous_shards_are_ascending_runs_in_rank_order(n, size):
    plan = ShardPlan(n, size)
    flat = np.concatenate([plan.indices(r) for r in range(size)])
    np.testing.assert_array_equal(flat, np.arange(n))


def test_strided_deals_round_robin():
    plan = ShardPlan(7, 3, "strided")
    assert [plan.indices(r).tolist() for r in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]


def test_more_ranks_than_records():
    plan = ShardPlan(2, 5)
    assert plan.counts() == [1, 1, 0, 0, 0]


@pytest.mark.parametrize("kwargs, message", [
    ({"n": -1, "size": 2}, "n must be >= 0"),
    ({"n": 3, "size": 0}, "size must be >= 1"),
    ({"n": 3, "size": 2, "kind": "random"}, "kind must be one of"),
])
def test_bad_plans_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ShardPlan(**kwargs)


def test_rank_outside_plan_is_rejected():
    with pytest.raises(ValueError, match="rank 2 outside 0..1"):
        ShardPlan(3, 2).indices(2)


def test_deal_wrapped_gives_every_rank_the_same_count():
    from hvdinfer.data.shard import deal_wrapped

    order = np.arange(7)
    shares = [deal_wrapped(order, 3, r, 3).tolist() for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4, 1], [2, 5, 2]]
    assert deal_wrapped(np.arange(2), 3, 2, 2).tolist() == [0, 1]  # dealt nothing: wraps the whole order
