"""Ordered collection: every rank's variable-length results, back in global input order.

Each rank holds the global indices of the items it computed and, per field, either a numpy array
whose first axis runs over those items or a list of JSON-able records. `collect_ordered` gathers
all of them with Horovod allgather and returns each field ordered by global index, on every rank.

It checks what it is given before moving any payload: every rank must send the same fields with
the same dtype and trailing shape, and the indices of all ranks together must be exactly
0..total-1 (nothing lost, nothing twice). A violation raises the same ValueError on every rank.
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import numpy as np

Payload = Mapping[str, "np.ndarray | Sequence[Any]"]


def _allgather(array: np.ndarray) -> np.ndarray:
    import horovod.tensorflow as hvd
    import tensorflow as tf

    # Horovod: allgather concatenates along axis 0 in rank order; ranks may send 0 rows.
    return hvd.allgather(tf.convert_to_tensor(array)).numpy()


def allgather_json(obj: Any) -> list[Any]:
    """Every rank's JSON-able `obj`, as a list in rank order."""
    blobs = _allgather_blobs([json.dumps(obj).encode("utf-8")])
    return [json.loads(b) for b in blobs]


def _allgather_blobs(blobs: Sequence[bytes]) -> list[bytes]:
    """Concatenate per-rank lists of byte strings in rank order (two allgathers: lengths, bytes)."""
    lengths = np.fromiter((len(b) for b in blobs), dtype=np.int64, count=len(blobs))
    data = np.frombuffer(b"".join(blobs), dtype=np.uint8)
    all_lengths = _allgather(lengths)
    all_data = _allgather(data).tobytes()
    offsets = np.concatenate([[0], np.cumsum(all_lengths)])
    return [all_data[offsets[i]:offsets[i + 1]] for i in range(len(all_lengths))]


def _describe(name: str, value: Any, count: int) -> dict:
    if isinstance(value, np.ndarray):
        if value.ndim == 0 or value.shape[0] != count:
            raise ValueError(f"field '{name}': first axis has {value.shape[:1]} rows for {count} indices")
        if value.dtype.kind not in "fiub":
            raise ValueError(f"field '{name}': dtype {value.dtype} cannot be allgathered; send records")
        return {"kind": "array", "dtype": value.dtype.str, "trailing": list(value.shape[1:])}
    if len(value) != count:
        raise ValueError(f"field '{name}': {len(value)} records for {count} indices")
    return {"kind": "records"}


def _check_agreement(metas: list[dict], expected_total: int | None) -> int:
    """Raise the same ValueError on every rank if the ranks' fields disagree; return the total."""
    errors = [m["error"] for m in metas if m.get("error")]
    if errors:
        raise ValueError("collect_ordered: " + "; ".join(errors))
    reference = metas[0]["fields"]
    for rank, meta in enumerate(metas[1:], start=1):
        if meta["fields"] != reference:
            raise ValueError(
                f"collect_ordered: rank {rank} sent fields {meta['fields']} but rank 0 sent {reference}")
    total = sum(m["count"] for m in metas)
    if expected_total is not None and total != expected_total:
        raise ValueError(f"collect_ordered: ranks hold {total} items in all, expected {expected_total}")
    return total


def collect_ordered(indices: Sequence[int] | np.ndarray, payload: Payload,
                    expected_total: int | None = None) -> dict[str, Any]:
    """Gather `payload` from all ranks and return each field in global index order, on every rank.

    `indices[i]` is the global position of item i of every field on this rank. Arrays come back as
    one array, records as one list. Ranks may hold zero items.
    """
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    count = len(indices)
    meta: dict[str, Any] = {"count": count, "fields": {}}
    try:
        meta["fields"] = {name: _describe(name, value, count) for name, value in sorted(payload.items())}
    except (TypeError, ValueError) as exc:
        meta["error"] = str(exc)
    # Horovod: one small collective so every rank fails or proceeds together.
    total = _check_agreement(allgather_json(meta), expected_total)

    all_indices = _allgather(indices)
    order = np.argsort(all_indices, kind="stable")
    if not np.array_equal(all_indices[order], np.arange(total)):
        seen = np.bincount(all_indices[(all_indices >= 0) & (all_indices < total)], minlength=total)
        missing, twice = np.flatnonzero(seen == 0)[:5].tolist(), np.flatnonzero(seen > 1)[:5].tolist()
        raise ValueError(f"collect_ordered: indices are not a permutation of 0..{total - 1} "
                         f"(missing e.g. {missing}, repeated e.g. {twice})")

    out: dict[str, Any] = {}
    for name, desc in meta["fields"].items():
        value = payload[name]
        if desc["kind"] == "array":
            local = np.ascontiguousarray(value).reshape(count, *desc["trailing"])
            if local.dtype == np.bool_:  # Horovod's allgather has no bool kernel
                out[name] = _allgather(local.view(np.uint8))[order].view(np.bool_)
            else:
                out[name] = _allgather(local)[order]
        else:
            blobs = _allgather_blobs([json.dumps(r).encode("utf-8") for r in value])
            out[name] = [json.loads(blobs[i]) for i in order]
    return out


def allreduce_sum(array: np.ndarray) -> np.ndarray:
    """Element-wise sum of `array` over all ranks (same shape everywhere), e.g. confusion counts."""
    import horovod.tensorflow as hvd
    import tensorflow as tf

    array = np.asarray(array)
    # Horovod: float64 keeps integer counts exact far beyond any eval set.
    total = hvd.allreduce(tf.convert_to_tensor(array.astype(np.float64)), op=hvd.Sum).numpy()
    return total.astype(array.dtype) if array.dtype.kind in "iu" else total
