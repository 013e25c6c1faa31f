"""Training checkpoints on disk, shared by every training task (finetune, pretrain): written whole
by the coordinator, found again after a crash, and checked to continue the very same run.

A checkpoint is a directory `root/NAME` holding a tf.train.Checkpoint (`ckpt.*`: weights,
optimizer state, anything else the task tracks; or any object with its `write`/`read`, such as a
tensor-parallel model's full state, hvdinfer/parallel/sharded_state.py) and `state.json` (where
training stands and the run's identity: the settings that must not change for a resume to be
exact). It is staged as
`root/.NAME.partial` and renamed into place, so a directory with a state.json is complete; removed
ones are renamed out of sight first (`.NAME.stale`). Which names a task uses (epoch-NNNN,
step-NNNNNNNN) and how it orders them is the task's business.

Test-only knob: HVDINFER_TEST_EXIT_AFTER_CHECKPOINT=k makes the coordinator exit with status 3
right after writing its k-th checkpoint of the process (mpirun then ends the other ranks): a crash
at a known point, for the resume tests.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from hvdinfer import runtime
from hvdinfer.runtime import JobError

STATE = "state.json"
TEST_EXIT_AFTER_CHECKPOINT = "HVDINFER_TEST_EXIT_AFTER_CHECKPOINT"
TEST_EXIT_STATUS = 3


def save(ckpt, root: Path, name: str, state: dict) -> Path:
    """Coordinator only: `ckpt` (a tf.train.Checkpoint) + state.json as root/name, swapped in whole."""
    final = root / name
    staging = final.with_name(f".{final.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    ckpt.write(str(staging / "ckpt"))
    (staging / STATE).write_text(json.dumps(state, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    return final


def remove(root: Path, pattern: str, keep: Path | None = None) -> None:
    """Remove every checkpoint of root matching `pattern` but `keep`: renamed out of sight first."""
    for path in root.glob(pattern):
        if path != keep:
            stale = path.with_name(f".{path.name}.stale")
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(path, stale)
            shutil.rmtree(stale)


def complete(root: Path, *patterns: str) -> list[tuple[Path, dict]]:
    """(path, state) of every complete checkpoint of root matching one of `patterns`."""
    found = []
    for pattern in patterns:
        for path in sorted(root.glob(pattern)) if root.is_dir() else []:
            if (path / STATE).is_file():
                found.append((path, json.loads((path / STATE).read_text())))
    return found


def check_same_run(path: Path, state: dict, identity: dict) -> None:
    """Refuse to resume from `path` when a setting of this run's `identity` differs from the one it was written with."""
    changed = {k: (state.get(k), v) for k, v in identity.items() if state.get(k) != v}
    if changed:
        raise JobError(f"--resume: {path} was written with other settings, so resuming would not continue "
                       "the same run: " + "; ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in changed.items()))


def restore(ckpt, path: Path, optimizer, step: int) -> None:
    """Every rank reads the checkpoint (rank 0's copy is then broadcast anyway); the optimizer must
    land on the step state.json recorded."""
    ckpt.read(str(path / "ckpt")).assert_consumed()
    if int(optimizer.iterations.numpy()) != step:
        raise JobError(f"--resume: {path} restored step {int(optimizer.iterations.numpy())}, expected {step}")


class WriteCounter:
    """Counts the checkpoints this process wrote and honours the test knob after each."""

    def __init__(self):
        self.written = 0

    def wrote(self, path: Path) -> None:
        self.written += 1
        if os.environ.get(TEST_EXIT_AFTER_CHECKPOINT) == str(self.written):
            runtime.LOG.warning("%s=%d: exiting after writing %s", TEST_EXIT_AFTER_CHECKPOINT, self.written, path)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(TEST_EXIT_STATUS)
