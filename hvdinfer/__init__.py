"""hvdinfer's public Python API, for your own scripts run with horovodrun or mpirun:

    horovodrun -np 2 python my_script.py
    mpirun -np 2 --oversubscribe --bind-to none python my_script.py

    import hvdinfer
    hvdinfer.init()                                     # Horovod + threads, MPI yield, watchdog
    preds = hvdinfer.predict(model, x, batch_size=256)  # all rows in input order, on every rank
    hvdinfer.predict(model, x, output="preds.npy", resume=True)   # streamed, journaled, resumable
    outs = hvdinfer.generate("runs/lm/model", ["ROMEO:", "To be"], max_new_tokens=40, temperature=0.8, seed=1)
    # outs: [{"text": ..., "tokens": [...], "finish_reason": "length"|"stop"|"eos"}, ...] in order, every rank
    if hvdinfer.is_coordinator(): print(preds.shape)

Fine-tuning your own Keras model data-parallel with the same runtime:

    optimizer, callbacks = hvdinfer.data_parallel(tf.keras.optimizers.Adam(hvdinfer.scaled_lr(1e-3)))
    model.compile(optimizer=optimizer, loss=...)
    rows = hvdinfer.shard(len(x_train))                 # this rank's share of the training rows
    model.fit(x_train[rows], y_train[rows], callbacks=callbacks, verbose=hvdinfer.is_coordinator())

This module re-exports; the code lives in hvdinfer.engine, hvdinfer.parallel and hvdinfer.tasks.
"""
from __future__ import annotations

__version__ = "0.2.0"
__all__ = ["init", "predict", "generate", "rank", "size", "local_rank", "is_coordinator", "data_parallel", "scaled_lr",
           "shard", "JobError"]

from hvdinfer.runtime import JobError


def init(stall_timeout: float = 60.0, seed: int = 0, threads: int = 0):
    """Start this rank: Horovod, TF thread share, Open MPI's yield fix, device pinning, watchdog.

    Idempotent; returns the Runtime (rank, size, local_rank, device, ...). A rank that makes no
    progress (see `hvdinfer.engine.watchdog`) for `stall_timeout` seconds ends the whole job.
    """
    from hvdinfer import runtime
    from hvdinfer.engine import job

    return job.start(runtime.RuntimeConfig(seed=seed, intra_op_threads=threads), stall_timeout).rt


def _rt():
    from hvdinfer.engine import job

    return job.start().rt


def rank() -> int:
    return _rt().rank


def size() -> int:
    return _rt().size


def local_rank() -> int:
    return _rt().local_rank


def is_coordinator() -> bool:
    return _rt().is_coordinator


def predict(model, x, batch_size: int = 256, output=None, resume: bool = False, schedule: str = "dynamic",
            chunk_size: int = 0, progress: bool = True):
    """See hvdinfer.tasks.predict.predict."""
    from hvdinfer.tasks.predict import predict as _predict

    return _predict(model, x, batch_size=batch_size, output=output, resume=resume, schedule=schedule,
                    chunk_size=chunk_size, progress=progress)


def generate(model, prompts, *, output=None, resume: bool = False, progress: bool = True, **settings):
    """See hvdinfer.tasks.generate.generate_texts: every prompt's continuation, in order, on every rank."""
    from hvdinfer.tasks.generate import generate_texts

    return generate_texts(model, prompts, output=output, resume=resume, progress=progress, **settings)


def data_parallel(optimizer):
    """(hvd.DistributedOptimizer(optimizer), callbacks) for compile/fit on every rank: gradients
    averaged over ranks, rank 0's initial weights broadcast, epoch metrics averaged, each step
    reported to the watchdog."""
    _rt()
    from hvdinfer.engine.keras_beat import WatchdogBeat
    from hvdinfer.parallel.data_parallel import apply_data_parallel

    distributed, callbacks = apply_data_parallel(optimizer)
    return distributed, callbacks + [WatchdogBeat()]


def scaled_lr(base_lr: float, scale: bool = True) -> float:
    """Horovod's rule: the learning rate times the number of ranks (the effective batch grows)."""
    from hvdinfer.parallel.data_parallel import scaled_learning_rate

    return scaled_learning_rate(base_lr, size(), scale)


def shard(n: int, seed: int | None = None):
    """This rank's row indices of n rows for data-parallel training: dealt round-robin (after a
    seeded shuffle when `seed` is given) and wrapped around so every rank gets ceil(n / size) rows.
    Equal counts matter: every rank must take the same number of steps, or the gradient allreduce
    of the rank with one step more waits forever."""
    import numpy as np

    from hvdinfer.data.shard import deal_wrapped

    rt = _rt()
    order = np.random.default_rng(seed).permutation(n) if seed is not None else np.arange(n)
    return deal_wrapped(order, rt.size, rt.rank, -(-n // rt.size))
