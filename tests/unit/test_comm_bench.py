"""The communication bench's pure parts: link classes as numbers, bus bandwidth, the Horovod
timeline split, scaling over the baseline and goal verdicts, the variant table and its flags."""
import pytest

from hvdinfer import cli
from hvdinfer.bench import comm


def test_link_shapes_as_numbers():
    assert comm.LINKS["10gbit"].rate_bytes_per_s() == pytest.approx(1.25e9)
    assert comm.LINKS["1gbit"].rate_bytes_per_s() == pytest.approx(1.25e8)
    assert comm.LINKS["1gbit"].delay_s() == pytest.approx(1e-3)


def test_bus_bandwidth_is_nccl_tests_definition():
    assert comm.bus_bandwidth(100, 1.0, 2) == pytest.approx(100)
    assert comm.bus_bandwidth(100, 2.0, 4) == pytest.approx(75)


def test_parse_tuning():
    assert comm.parse_tuning("32:10") == (32, 10.0)
    assert comm.parse_tuning("0:0.5") == (0, 0.5)
    for bad in ("32", "a:1", "32:0", "-1:5"):
        with pytest.raises(ValueError):
            comm.parse_tuning(bad)


def events(pid, name, *spans):
    """A tensor's collectives as a Horovod timeline writes them: negotiation, then the op with nested activities."""
    out = [{"name": "process_name", "ph": "M", "pid": pid, "args": {"name": name}}]
    for negotiate, op, nested in spans:
        out += [{"ph": "B", "name": "NEGOTIATE_ALLREDUCE", "ts": negotiate[0], "pid": pid},
                {"ph": "X", "name": "0", "ts": negotiate[0], "pid": pid},
                {"ph": "E", "ts": negotiate[1], "pid": pid},
                {"ph": "B", "name": "ALLREDUCE", "ts": op[0], "pid": pid}]
        for activity, start, end in nested:
            out += [{"ph": "B", "name": activity, "ts": start, "pid": pid}, {"ph": "E", "ts": end, "pid": pid}]
        out.append({"ph": "E", "ts": op[1], "pid": pid})
    return out


def test_timeline_phases_split_the_steps_after_warm_up_by_activity():
    # Two gradients fused in each of 3 steps; step 0 is skipped. Times in microseconds.
    a = events(1, "grad_a", ((0, 10), (10, 50), [("MPI_ALLREDUCE", 20, 40)]),
               ((1000, 1010), (1010, 1110), [("MEMCPY_IN_FUSION_BUFFER", 1010, 1020), ("MPI_ALLREDUCE", 1020, 1100)]),
               ((2000, 2020), (2020, 2120), [("MEMCPY_IN_FUSION_BUFFER", 2020, 2030), ("MPI_ALLREDUCE", 2030, 2110)]))
    b = events(2, "grad_b", ((5, 10), (10, 50), [("MPI_ALLREDUCE", 20, 40)]),
               ((1005, 1010), (1010, 1110), [("MEMCPY_IN_FUSION_BUFFER", 1010, 1020), ("MPI_ALLREDUCE", 1020, 1100)]),
               ((2000, 2020), (2020, 2120), [("MEMCPY_IN_FUSION_BUFFER", 2020, 2030), ("MPI_ALLREDUCE", 2030, 2110)]))
    broadcast = [{"ph": "B", "name": "BROADCAST", "ts": 0, "pid": 3}, {"ph": "E", "ts": 5000, "pid": 3}]
    merged = sorted(a + b + broadcast, key=lambda e: e.get("ts", -1))
    phases = comm.timeline_phases(merged, skip_steps=1)
    assert phases["steps"] == 2
    per_step = phases["per_step_seconds"]
    assert per_step["MPI_ALLREDUCE"] == pytest.approx(80e-6)
    assert per_step["MEMCPY_IN_FUSION_BUFFER"] == pytest.approx(10e-6)
    assert per_step["communication"] == pytest.approx(100e-6)
    assert per_step["NEGOTIATE_ALLREDUCE"] == pytest.approx(15e-6)
    assert "BROADCAST" not in per_step
    assert comm.timeline_phases(merged, skip_steps=3) == {"steps": 0, "per_step_seconds": {}}


def test_union_length_counts_overlaps_once():
    assert comm.union_length([(0, 10), (5, 15), (20, 30), (21, 22)]) == 25
    assert comm.union_length([]) == 0


def test_read_timeline_keeps_the_complete_events_of_a_cut_file(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('[\n{"ph": "B", "name": "ALLREDUCE", "ts": 1, "pid": 1},\n{"ph": "E", "ts": 2, "pid": 1},'
                    '{"ph": "B", "na')
    assert [e["ph"] for e in comm.read_timeline(path)] == ["B", "E"]
    assert comm.read_timeline(tmp_path / "absent.json") == []


def test_scaling_over_the_mean_baseline_and_the_goals():
    results = {"1host/first": {"records_per_s": 9.0, "ranks": 1, "step_seconds": [1.0, 0.9]},
               "1host/last": {"records_per_s": 11.0, "ranks": 1, "step_seconds": [0.8, 1.0]},
               "10gbit/defaults": {"records_per_s": 18.0, "ranks": 2, "step_seconds": [1.0, 0.9]},
               "1gbit/defaults": {"records_per_s": 13.0, "ranks": 2, "step_seconds": [1.6, 1.3]},
               "local/2 ranks, defaults": {"records_per_s": 30.0, "ranks": 2, "step_seconds": [0.5]}}
    scaling = comm.scaling_ratios(results, [9.0, 11.0])
    assert scaling == {"10gbit/defaults": pytest.approx(1.8), "1gbit/defaults": pytest.approx(1.3)}
    fastest = comm.fastest_step_ratios(results)
    assert fastest == {"10gbit/defaults": pytest.approx(2 * 0.8 / 0.9), "1gbit/defaults": pytest.approx(2 * 0.8 / 1.3)}
    allreduce = {"1gbit": {"defaults": {"methods": {"hvd": {"64": {"bus_Bps": 1.1e8, "best_bus_Bps": 1.2e8}}}}}}
    goals = comm.goal_table(allreduce, scaling, comm.LINKS)
    assert goals["allreduce 64 MiB bus bandwidth / 1 Gbit/s link rate"]["value"] == pytest.approx(0.88)
    assert goals["allreduce 64 MiB bus bandwidth / 1 Gbit/s link rate"]["met"]
    assert goals["allreduce 64 MiB bus bandwidth / 1 Gbit/s link rate"]["fastest_call"] == pytest.approx(0.96)
    assert goals["finetune 2 hosts / 1 host, 10 Gbit/s"]["met"]
    assert not comm.goal_table({}, {"10gbit/defaults": 1.5}, comm.LINKS)["finetune 2 hosts / 1 host, 10 Gbit/s"]["met"]


def test_every_finetune_row_runs_on_a_known_link_and_names_are_unique(tmp_path):
    rows = (comm.finetune_rows((32, 10.0), tmp_path, timeline=True)
            + comm.local_rows(comm.LOCAL_CANDIDATES, timeline=True))
    assert {r.link for r in rows} <= set(comm.LINKS) | {"local"}
    keys = [f"{r.link}/{r.name}" for r in rows]
    assert len(keys) == len(set(keys))
    tuned = next(r for r in rows if r.name.startswith("fusion"))
    assert tuned.env == {"HOROVOD_FUSION_THRESHOLD": str(32 * 2**20), "HOROVOD_CYCLE_TIME": "10"}
    assert "--compression" in comm.finetune_flags(16, next(r for r in rows if "fp16" in r.name))


def test_bench_comm_and_cluster_flags_parse():
    args = cli.build_parser().parse_args(["bench", "comm", "--comm-parts", "local", "--comm-tuning", "8:2",
                                          "--comm-local-env", "HOROVOD_CYCLE_TIME=0.5,HOROVOD_FUSION_THRESHOLD=0"])
    assert args.comm_parts == ("local",) and args.comm_tuning == (8, 2.0)
    assert args.comm_local_env == [{"HOROVOD_CYCLE_TIME": "0.5", "HOROVOD_FUSION_THRESHOLD": "0"}]
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["bench", "comm", "--comm-local-env", "oops"])
