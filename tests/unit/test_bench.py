"""The benches' pure parts: the probed phases exist and add up, goals and their verdicts, the
generated short texts, the bench flags."""
import functools
import importlib
import json

import pytest

from hvdinfer import cli
from hvdinfer.bench import engine, infer, peer, probe, report


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


def test_every_generate_probe_exists_and_the_command_picks_its_probes():
    for module_name, attr, _ in probe.GENERATE_PROBES:
        owner = importlib.import_module(module_name)
        assert callable(functools.reduce(getattr, attr.split("."), owner)), f"{module_name}.{attr}"
    assert probe.PROBES_BY_COMMAND["generate"] is probe.GENERATE_PROBES
    assert probe.PROBES_BY_COMMAND["infer"] is probe.PROBES


def fake_generate_run(wall=30.0):
    calls = {name: {"calls": n, "seconds": s, "first_call_seconds": first} for name, n, s, first in [
        ("start", 1, 1.0, 1.0), ("resolve_precision", 1, 0.1, 0.1), ("load_model", 1, 2.0, 2.0),
        ("plan_job", 1, 0.5, 0.5), ("index_input", 1, 0.2, 0.2), ("check_records", 1, 0.1, 0.1),
        ("DiskJournal.__init__", 1, 0.1, 0.1), ("run_chunks", 1, 20.0, 20.0), ("PromptChunks.compute", 2, 19.0, 9.0),
        ("generate_batch", 8, 18.5, 3.0), ("_CachedSteps.first", 8, 2.0, 0.5), ("_CachedSteps.next", 11, 15.0, 2.5),
        ("choose_tokens", 12, 0.5, 0.1), ("PromptChunks.prepare", 2, 0.3, 0.2), ("DiskJournal.put", 2, 0.1, 0.1),
        ("write_output", 1, 0.4, 0.4), ("DiskJournal.close", 1, 0.1, 0.1), ("finish", 1, 0.0, 0.0)]}
    rank0 = {"process_start": 100.2, "probe_start": 100.3, "tensorflow_imported": 103.3, "hvdinfer_imported": 103.4,
             "main_returned": 128.5, "peak_rss_mb": 900.0, "calls": calls}
    return {"launched": 100.0, "ended": 100.0 + wall, "wall_seconds": wall, "ranks": {0: rank0}}


def test_generate_breakdown_adds_up_and_separates_the_decoder_phases():
    from hvdinfer.bench import generate

    got = generate.job_breakdown(fake_generate_run())
    phases = got["phases"]
    assert sum(phases.values()) == pytest.approx(30.0)
    assert phases["chunks: prefill"] == 2.0 and phases["chunks: decode steps"] == 15.0
    assert phases["chunks: rest of each batch (padding, rows, results)"] == pytest.approx(18.5 - 2.0 - 15.0 - 0.5)
    assert phases["chunks: rank 0 other (waiting for workers, hand-offs)"] == pytest.approx(1.0)
    # The first step traces the graph: what it took beyond an average step.
    assert got["overlapped"]["decode graph trace (inside the first decode step)"] == pytest.approx(2.5 - 12.5 / 10)
    groups = generate.grouped(phases)
    assert sum(groups.values()) == pytest.approx(30.0)
    assert groups["decode steps"] == 15.0 and groups["host sampling"] == 0.5 and groups["prefill"] == 2.0
    peer_phases = {"launch + interpreter start": 1.0, "imports (torch, transformers)": 5.0, "model load": 1.0,
                   "reading the input": 0.1, "generate (tokenise + prefill + steps + sampling)": 20.0,
                   "output writing": 0.1, "exit": 0.5}
    assert generate.grouped(peer_phases)["decode steps"] == 20.0
    assert sum(generate.grouped(peer_phases).values()) == pytest.approx(27.7)


def test_generate_goal_verdicts():
    from hvdinfer.bench import generate

    decoder = {"recompute, long": {"tokens_per_s": 10.0}, "cache, long": {"tokens_per_s": 150.0},
               "batch 1": {"tokens_per_s": 25.0}, "batch 32": {"tokens_per_s": 180.0}}
    jobs = {"1 rank": {"compute_tokens_per_s": 100.0, "end_to_end_tokens_per_s": 80.0},
            "2 ranks": {"compute_tokens_per_s": 170.0, "end_to_end_tokens_per_s": 120.0}}
    peer = {"end_to_end_tokens_per_s": 75.0}
    goals = generate.goal_table(decoder, jobs, peer, 2)
    assert goals["KV cache / full recompute"]["value"] == pytest.approx(15.0) and goals["KV cache / full recompute"]["met"]
    assert goals["batch 32 / batch 1"]["value"] == pytest.approx(7.2) and not goals["batch 32 / batch 1"]["met"]
    assert goals["2 ranks / 1 rank"]["value"] == pytest.approx(1.7) and not goals["2 ranks / 1 rank"]["met"]
    assert goals["hvdinfer 1 rank / HF generate"]["met"]  # 1.07
    assert goals["hvdinfer 2 ranks / HF generate"]["value"] == pytest.approx(1.6)
    assert goals["2 ranks / 1 rank"]["goal"] == ">= 1.8"
    json.dumps(goals)
    assert set(generate.goal_table(decoder, jobs, None, 2)) == {"KV cache / full recompute", "batch 32 / batch 1",
                                                                 "2 ranks / 1 rank"}


def test_early_stops_end_the_early_prompts_only():
    from hvdinfer.bench import generate

    pieces = {1: " a", 2: " b", 3: " c", 4: " d", 5: "-x", 6: " e", 7: " "}
    decode = lambda tokens: "".join(pieces[t] for t in tokens)
    continuations = [[1, 1, 1, 1], [2, 5, 3, 3], [1, 4, 4, 4], [6, 7, 1, 1]]
    stops = generate.early_stops(continuations, decode, {1, 3}, stop_at=1)
    # prompt 1: " b" would stop it; prompt 3: " e" ("-x" looks like a flag, " " and " a" occur in others)
    assert stops == [" b", " e"]
    for i, tokens in enumerate(continuations):
        assert any(s in decode(tokens) for s in stops) == (i in {1, 3})


def test_generate_bench_flags():
    args = cli.build_parser().parse_args(["bench", "generate", "--generate-prompts", "384", "--generate-size", "debug"])
    assert args.which == "generate" and args.generate_prompts == 384 and args.generate_size == "debug"
    assert args.generate_long_tokens == 256 and args.generate_recompute_batch == 4


def test_early_stops_take_two_tokens_where_one_is_not_unique():
    from hvdinfer.bench import generate

    pieces = {1: " a", 2: " b"}
    decode = lambda tokens: "".join(pieces[t] for t in tokens)
    continuations = [[1, 1, 1, 1], [2, 2, 2, 2], [1, 2, 1, 2]]
    # prompt 2: " a" and " b" occur in the others; " b a" (its tokens 1 and 2) does not
    assert generate.early_stops(continuations, decode, {2}, stop_at=1) == [" b a"]


def test_goal_entries_compare_as_written():
    assert report.goal(1.2, ">=", 1.3) == {"value": 1.2, "goal": ">= 1.3", "met": False}
    assert report.goal(0.02, "<=", 0.03, what="share of wall")["met"]
    assert report.goal(0, "==", 0)["goal"] == "== 0" and report.goal(True, "==", True)["met"]
    with pytest.raises(KeyError):
        report.goal(1.0, ">", 0.5)


def test_completion_mixes_and_the_ceiling_of_continuous_over_static_batching():
    import numpy as np

    from hvdinfer.bench import serve

    rng = np.random.default_rng(0)
    uniform = serve.completion_lengths(20_000, "uniform", rng)
    chat = serve.completion_lengths(20_000, "chat", rng)
    assert uniform.min() >= 8 and uniform.max() <= 128
    assert ((chat <= 32) | (chat >= 96)).all() and 0.2 < (chat >= 96).mean() < 0.3
    assert serve.static_share(np.full(100, 40), 16) == 1.0  # equal lengths: static wastes nothing
    # 8..128 in groups of 16: the longest is about 121 against a mean of 68.
    assert 1 / serve.static_share(uniform, 16) == pytest.approx(1.79, abs=0.03)
    assert 1 / serve.static_share(chat, 16) > 2.5
    # At step costs: a flat step gives the arithmetic ceiling, a step that is all per-row cost gives none.
    assert serve.continuous_ceiling(chat, 16, 1.0, 0.0) == pytest.approx(1 / serve.static_share(chat, 16))
    assert serve.continuous_ceiling(chat, 16, 0.0, 1.0) == pytest.approx(1.0)
    # Lengths 10 and 30 in groups of 64 (the longest is 30, the mean 20), a step 2 + 0.5 per row: static
    # 30 steps x 2 + 64 x 20 tokens x 0.5 = 700, continuous 20 x 2 + 640 = 680.
    assert serve.continuous_ceiling(np.array([10, 30]), 64, 2.0, 0.5) == pytest.approx(700 / 680)
    loads = serve.completions_load(2, 3, mix="chat")
    assert [len(c) for c in loads] == [3, 3]
    asked = [json.loads(body)["max_tokens"] for c in loads for _, body in c]
    assert all(8 <= n <= 32 or 96 <= n <= 128 for n in asked)
