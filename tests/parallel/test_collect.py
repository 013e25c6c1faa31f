"""collect_ordered under size 1, `mpirun -np 2` and `mpirun -np 3` (uneven shards, empty ranks)."""
import numpy as np
import pytest

from hvdinfer.collect import allgather_json, collect_ordered
from hvdinfer.data.shard import ShardPlan

NP3 = True  # Makefile: also run this file under mpirun -np 3


def _rows(indices: np.ndarray, width: int = 3) -> np.ndarray:
    return (indices[:, None] * 10 + np.arange(width)[None, :]).astype(np.float32)


@pytest.mark.parametrize("kind", ["contiguous", "strided"])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 17])
def test_arrays_and_records_come_back_in_input_order(rt, kind, n):
    indices = ShardPlan(n, rt.size, kind).indices(rt.rank)
    records = [{"id": f"rec-{i}", "text": "é" * int(i), "rank": rt.rank} for i in indices]
    out = collect_ordered(indices, {"emb": _rows(indices), "rec": records}, expected_total=n)
    np.testing.assert_array_equal(out["emb"], _rows(np.arange(n)))
    assert [r["id"] for r in out["rec"]] == [f"rec-{i}" for i in range(n)]
    assert [len(r["text"]) for r in out["rec"]] == list(range(n))


def test_shuffled_local_order_is_restored(rt):
    # A rank may compute its items in any order (length buckets): indices carry the order.
    indices = ShardPlan(11, rt.size, "strided").indices(rt.rank)[::-1].copy()
    out = collect_ordered(indices, {"x": indices.astype(np.int64), "flag": indices % 2 == 0})
    np.testing.assert_array_equal(out["x"], np.arange(11))
    np.testing.assert_array_equal(out["flag"], np.arange(11) % 2 == 0)


def test_more_ranks_than_items(rt):
    indices = np.array([0]) if rt.rank == rt.size - 1 else np.array([], dtype=np.int64)
    out = collect_ordered(indices, {"v": np.full((len(indices), 2), 7.0)}, expected_total=1)
    np.testing.assert_array_equal(out["v"], [[7.0, 7.0]])


def test_allgather_json_is_in_rank_order(rt):
    assert allgather_json({"r": rt.rank}) == [{"r": r} for r in range(rt.size)]


def test_lost_item_raises_on_every_rank(rt):
    indices = ShardPlan(6, rt.size).indices(rt.rank)
    if rt.rank == rt.size - 1:
        indices = indices[:-1]  # the last rank "loses" its last item
    with pytest.raises(ValueError, match="ranks hold 5 items in all, expected 6"):
        collect_ordered(indices, {"v": np.zeros((len(indices), 1))}, expected_total=6)


def test_duplicate_index_raises_on_every_rank(rt):
    indices = np.array([0, 0]) if rt.rank == 0 else np.array([], dtype=np.int64)
    with pytest.raises(ValueError, match="not a permutation"):
        collect_ordered(indices, {"v": np.zeros((len(indices), 1))})


def test_mismatched_width_raises_on_every_rank(rt):
    if rt.size < 2:
        pytest.skip("needs two ranks")
    indices = ShardPlan(4, rt.size).indices(rt.rank)
    width = 3 if rt.rank == 0 else 4
    with pytest.raises(ValueError, match=r"rank 1 sent fields .*4.* but rank 0 sent .*3"):
        collect_ordered(indices, {"v": np.zeros((len(indices), width))})


def test_row_count_mismatch_raises_on_every_rank(rt):
    indices = ShardPlan(4, rt.size).indices(rt.rank)
    records = ["a"] * (len(indices) + (1 if rt.rank == 0 else 0))  # rank 0 sends one record too many
    with pytest.raises(ValueError, match=f"field 'v': {len(ShardPlan(4, rt.size).indices(0)) + 1} records for"):
        collect_ordered(indices, {"v": records})
