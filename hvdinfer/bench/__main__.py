"""What the benches launch, alone or under mpirun, each in its own process tree:

    python -m hvdinfer.bench worker --mode M ...      one variant; prints its result as one JSON line
    python -m hvdinfer.bench worker --mode generate --spec JSON     bench generate's one-process side
    python -m hvdinfer.bench worker --mode slot-steps --spec JSON   bench serve's decode-step costs
    python -m hvdinfer.bench worker --mode allreduce --methods M,... --sizes-mib 16,64   bench comm
    python -m hvdinfer.bench probe --out DIR -- ARGS  `hvdinfer ARGS` with phase timers (bench/probe.py)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hvdinfer.bench")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker")
    w.add_argument("--mode", choices=["keras", "naive", "hvdinfer", "train", "keras-fit", "generate", "allreduce",
                                       "slot-steps"],
                   required=True)
    w.add_argument("--threads", type=int, default=0, help="train: TF intra-op threads per rank")
    w.add_argument("--split-threads", action="store_true")
    w.add_argument("--intra", type=int, default=0, help="with --split-threads: override intra-op threads")
    w.add_argument("--inter", type=int, default=0, help="with --split-threads: override inter-op threads")
    w.add_argument("--records", type=int, default=256)
    w.add_argument("--batch", type=int, default=32)
    w.add_argument("--seq", type=int, default=128)
    w.add_argument("--model-size", default="minilm-l6")
    w.add_argument("--spec", default="{}", help="generate, slot-steps: the task and its settings, as JSON")
    w.add_argument("--compression", default="none", choices=["none", "fp16"], help="train: gradient compression")
    w.add_argument("--methods", default="hvd", help="allreduce: comma-separated methods (bench/comm.py)")
    w.add_argument("--sizes-mib", default="16", help="allreduce: comma-separated tensor sizes in MiB")
    w.add_argument("--repeats", type=int, default=5, help="allreduce: timed calls per method and size")
    p = sub.add_parser("probe")
    p.add_argument("--out", type=Path, required=True, help="each rank writes OUT/rank-R.json")
    p.add_argument("args", nargs=argparse.REMAINDER, help="-- then the hvdinfer command line")
    args = parser.parse_args(argv)
    if args.command == "probe":
        from hvdinfer.bench import probe

        from hvdinfer import runtime

        # Ends as the hvdinfer console script does, so the probed exit is the real one.
        runtime.exit_now(probe.run(args.out, args.args[1:] if args.args[:1] == ["--"] else args.args))
    if args.mode == "generate":
        from hvdinfer.bench import generate

        return generate.worker(args)
    if args.mode == "slot-steps":
        from hvdinfer.bench import serve

        return serve.slot_steps_worker(args)
    if args.mode == "allreduce":
        from hvdinfer.bench import comm

        return comm.worker(args)
    if args.mode in ("train", "keras-fit"):
        from hvdinfer.bench import finetune

        return finetune.worker(args)
    from hvdinfer.bench import runtime

    return runtime.worker(args)


if __name__ == "__main__":
    sys.exit(main())
