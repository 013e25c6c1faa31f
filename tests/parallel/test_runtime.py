"""The runtime under size 1 and `mpirun -np 2`: ranks, thread split, seeding."""
import os

import horovod.tensorflow as hvd
import tensorflow as tf

from hvdinfer import runtime


def test_runtime_matches_horovod(rt):
    assert (rt.rank, rt.size, rt.local_rank, rt.local_size) == (hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size())
    assert rt.is_coordinator == (hvd.rank() == 0)
    assert rt.device == "/CPU:0"  # no GPU on CI
    assert runtime.init_runtime() is rt  # idempotent


def test_threads_are_the_hosts_cores_split_across_local_ranks(rt):
    want = max(1, runtime.host_cores() // rt.local_size)
    assert rt.intra_op_threads == want == tf.config.threading.get_intra_op_parallelism_threads()
    assert rt.inter_op_threads == (1 if rt.local_size > 1 else 2)


def test_horovod_env_defaults_are_set_before_init(rt):
    assert os.environ["OMPI_MCA_mpi_yield_when_idle"] == "1"
    assert "HOROVOD_CYCLE_TIME" not in os.environ  # Horovod's own 1 ms
    assert int(os.environ["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"]) == runtime.STALL_SHUTDOWN_SECONDS


def test_cpu_tensors_come_from_tfs_pooling_allocator(rt):
    assert os.environ["TF_CPU_ALLOCATOR_USE_BFC"] == "true"
    tf.ones([256, 256])
    # Only the BFC allocator keeps statistics; TF's default CPU allocator raises here.
    assert tf.config.experimental.get_memory_info("CPU:0")["peak"] > 0


def test_seed_is_the_same_on_every_rank(rt):
    runtime.seed_everything(7)
    draw = tf.random.uniform([3])
    everyone = hvd.allgather(draw[None]).numpy()
    assert (everyone == everyone[0]).all()
