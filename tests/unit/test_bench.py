"""The benches' pure parts: the probed phases exist and add up, goals and their verdicts, the
generated short texts, the bench flags."""
import functools
import importlib
import json

import pytest

from hvdinfer import cli
from hvdinfer.bench import engine, infer, peer, probe


def test_every_probed_function_exists():
    for module_name, attr, _ in probe.PROBES:
        owner = importlib.import_module(module_name)
        assert callable(functools.reduce(getattr, attr.split("."), owner)), f"{module_name}.{attr}"


def fake_run(wall=20.0):
    calls = {name: {"calls": 1, "seconds": s} for name, s in [
        ("start", 1.0), ("resolve_precision", 0.1), ("load_model", 1.5), ("warm_up", 2.0), ("plan_job", 0.5),
        ("index_input", 0.2), ("check_records", 0.2), ("DiskJournal.__init__", 0.1), ("run_chunks", 8.0),
        ("TextChunks.compute", 7.0), ("TextChunks.prepare", 1.0), ("DiskJournal.put", 0.3),
        ("DiskJournal.read", 0.1), ("DiskJournal.close", 0.1), ("write_output", 0.4), ("finish", 0.0)]}
    rank0 = {"process_start": 100.2, "probe_start": 100.3, "tensorflow_imported": 103.3, "hvdinfer_imported": 103.4,
             "main_returned": 118.5, "peak_rss_mb": 500.0, "calls": calls}
    return {"launched": 100.0, "ended": 100.0 + wall, "wall_seconds": wall, "ranks": {0: rank0}}


def test_breakdown_adds_up_to_the_launchers_wall_time():
    phases = probe.breakdown(fake_run())["phases"]
    assert sum(phases.values()) == pytest.approx(20.0)
    assert phases["import tensorflow"] == pytest.approx(3.0)
    assert phases["plan to workers"] == pytest.approx(0.1)
    assert phases["chunks: rank 0 model forward"] == pytest.approx(7.0)
    assert phases["exit (MPI finalize, mpirun)"] == pytest.approx(1.5)


def test_every_phase_of_both_sides_falls_in_one_group():
    hvdinfer_phases = probe.breakdown(fake_run())["phases"]
    peer_phases = dict.fromkeys(["launch + interpreter start", "imports (torch, transformers, sentence-transformers)",
                                 "model load", "reading the input", "encode (tokenise + forward + pool)",
                                 "output writing", "exit"], 1.0)
    for phases in (hvdinfer_phases, peer_phases):
        groups = peer.grouped(phases)
        assert sum(groups.values()) == pytest.approx(sum(phases.values()))
    assert peer.grouped(hvdinfer_phases)["compute"] == pytest.approx(8.0)


def figures(compute, wall=None, rss=None):
    return {"compute_seconds": compute, "wall_seconds": wall or compute + 10, "peak_rss_mb": rss or {0: 500.0}}


def test_goal_table_verdicts():
    schedule = {"rank 1 2x slower, static": figures(30.0), "rank 1 2x slower, dynamic": figures(20.5),
                "balanced static": figures(20.0), "balanced dynamic": {**figures(20.4, wall=30.0),
                                                                       "journal_busy_seconds": 0.6},
                "balanced dynamic --no-journal": figures(20.0, wall=29.5)}
    resume = {"killed_compute_seconds": 10.0, "resumed": figures(11.0), "byte_identical": True}
    memory = {"10 records .npy": figures(1.0, rss={0: 500.0}), "1000 records .npy": figures(1.0, rss={0: 640.0})}
    goals = engine.goal_table(schedule, resume, memory, [10, 1000])
    assert goals["dynamic/static, rank 1 2x slower"]["value"] == pytest.approx(30.0 / 20.5)
    assert goals["dynamic/static, rank 1 2x slower"]["met"]
    assert goals["dynamic/static, balanced"]["met"]  # 0.98
    assert goals["journal overhead"]["value"] == pytest.approx(0.02) and goals["journal overhead"]["met"]
    assert goals["killed at 50% + resume / uninterrupted"]["value"] == pytest.approx(21.0 / 20.4)
    assert not goals["coordinator peak RSS, largest/smallest"]["met"]  # 1.28
    assert goals["resumed output byte-identical"]["met"]
    json.dumps(goals)


def test_short_texts_are_seeded_5_to_25_words(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    infer.short_text_input(a, 500)
    infer.short_text_input(b, 500)
    assert a.read_bytes() == b.read_bytes()
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(500))
    lengths = [len(r["text"].split()) for r in rows]
    assert min(lengths) == 5 and max(lengths) == 25
    assert {w for r in rows for w in r["text"].split()} <= set(infer.SHORT_WORDS)


def test_bench_flags():
    args = cli.build_parser().parse_args(["bench", "engine", "--rss-records", "1000,20000", "--repeats", "1"])
    assert args.which == "engine" and args.rss_records == (1000, 20000) and args.repeats == 1
    assert cli.build_parser().parse_args(["bench"]).rss_records == (10_000, 100_000, 1_000_000)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["bench", "--rss-records", "10k"])


def test_generate_ignore_eos_flag_reaches_the_sampling_parameters(tmp_path):
    argv = ["generate", "--model", "m", "--input", "in.jsonl", "--output", str(tmp_path / "o.jsonl")]
    assert not cli.build_parser().parse_args(argv).ignore_eos
    args = cli.build_parser().parse_args([*argv, "--ignore-eos"])
    from hvdinfer.tasks import generate

    cfg = generate.GenerateConfig(model=args.model, input=args.input, output=args.output, ignore_eos=args.ignore_eos)
    assert args.ignore_eos and cfg.sampling().ignore_eos
