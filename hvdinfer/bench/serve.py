"""`hvdinfer bench serve` (`make loadtest`): the serving goals of issue 10, measured side by side on
loopback and written to OUT/serve.json and OUT/serve.png with the host's CPU model and load.

    .venv/bin/hvdinfer bench serve --np 2 --out bench-out            # make loadtest
    .venv/bin/hvdinfer bench serve --clients 64 --requests 500 --completion-requests 40

Each load is --clients concurrent clients (one keep-alive HTTP/1.1 connection each, a minimal
asyncio client so the load generator stays cheap next to the server on a 2-core host), each sending
its requests one after another; latency is per request, throughput is requests (or generated
tokens) over the wall time from the first request to the last answer. Any non-200 answer counts
as an error.

  embeddings  minilm-l6 (or --embed-model), one short text (5-25 words) per request, against
              `hvdinfer serve --max-batch clients/(2 np)` on 1 and on --np ranks (two batches in hand per
              rank, so the next is there while one computes); beside it the offline
              `hvdinfer infer` over the same texts on the same ranks (its compute records/s), and
              the same server with --max-batch 1 (fewer requests: --batch1-requests per client).
  completions a GPT-2-layout model of random weights with the real GPT-2 vocabulary (4 blocks of
              width 128, 256 positions; --lm-model to use another), greedy, end-of-text ignored,
              max_tokens drawn per request (seeded) from 8..128 ("uniform"), and from a chat-like mix
              (three in four 8..32, one in four 96..128), --max-batch 16 per rank: continuous
              (iteration-level) batching on 1 and --np ranks, and static batching (a group of
              sequences at a time) on --np ranks, for each mix; tokens/s = completion tokens / wall.
              The report adds each mix's ceiling for continuous over static batching: the inverse of
              the share of a static group's slot-steps that decode (uniform 8..128: 1.79x; chat mix 2.78x),
              and the ceiling at this LM's decode-step costs, measured here with 1 and 16 sequences on
              one rank's threads (a step that costs more with more sequences narrows the gap).
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

from hvdinfer.bench import report as report_mod

WORDS = ("the a cat dog sat ran on under mat house river quickly slowly bright dark small large old new "
         "green red blue happy sad music garden window letter morning evening city road train").split()
SLOTS = 16  # --max-batch of the completion servers: sequences decoded together per rank
LM_CONFIG = dict(vocab_size=50257, n_positions=256, n_embd=128, n_layer=4, n_head=4)


def short_texts(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(5, 26))) for _ in range(count)]


def write_lm(path: Path) -> Path:
    """A random-weight GPT-2-layout directory with GPT-2's vocabulary (made once)."""
    if (path / "config.json").is_file():
        return path
    from hvdinfer import assets
    from models import gpt, gpt_loading
    from models.bpe import BPETokenizer

    config = gpt.GPTConfig(**LM_CONFIG)
    tokenizer = BPETokenizer.from_dir(assets.resolve_tokenizer("gpt2"))
    gpt_loading.save_gpt(gpt.random_init(gpt.GPT(config), seed=0), tokenizer, config, path)
    return path


# --- the load -------------------------------------------------------------------------------------
async def _client(port: int, requests: list[tuple[str, bytes]], out: list, deadline: float) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for path, body in requests:
            if time.monotonic() > deadline:
                out.append((0, 0.0, b""))
                continue
            start = time.perf_counter()
            writer.write(f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
            status = int((await reader.readline()).split()[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            data = await reader.readexactly(length)
            out.append((status, time.perf_counter() - start, data))
    finally:
        writer.close()


def drive(port: int, per_client: list[list[tuple[str, bytes]]], limit_s: float) -> dict:
    """Run every client's requests; latencies, errors, throughput, and the answers' bodies."""
    results: list[list] = [[] for _ in per_client]

    async def main():
        deadline = time.monotonic() + limit_s
        await asyncio.gather(*(_client(port, reqs, out, deadline) for reqs, out in zip(per_client, results)),
                             return_exceptions=False)

    start = time.perf_counter()
    asyncio.run(main())
    wall = time.perf_counter() - start
    flat = [r for rs in results for r in rs]
    latencies = np.array([lat for status, lat, _ in flat if status == 200])
    errors = sum(status != 200 for status, _, _ in flat)
    return {"requests": len(flat), "errors": int(errors), "wall_s": wall,
            "requests_per_s": (len(flat) - errors) / wall,
            "p50_ms": float(np.percentile(latencies, 50) * 1000) if len(latencies) else None,
            "p99_ms": float(np.percentile(latencies, 99) * 1000) if len(latencies) else None,
            "bodies": [data for status, _, data in flat if status == 200]}


# --- the server -------------------------------------------------------------------------------------
class Served:
    """`hvdinfer serve` under mpirun for one measurement."""

    def __init__(self, model: str, np_: int, port: int, *flags: str, log: Path):
        from hvdinfer.bench import report

        self.port, self.log = port, log
        cmd = report.mpirun_prefix(np_) + [str(Path(sys.executable).with_name("hvdinfer")), "serve", "--model",
                                           model, "--port", str(port), *flags]
        self.proc = subprocess.Popen(cmd, env=report.bench_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited {self.proc.returncode}:\n{log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"the server was not ready in 300 s:\n{log.read_text()[-2000:]}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        import psutil

        # Graceful: SIGTERM to the coordinator ends every rank with exit 0.
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if child.environ().get("OMPI_COMM_WORLD_RANK") == "0":
                    child.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _body(payload: dict) -> bytes:
    return json.dumps(payload).encode()


def embeddings_load(model_name: str, texts: list[str], clients: int, requests: int):
    return [[("/v1/embeddings", _body({"model": model_name, "input": texts[(c * requests + i) % len(texts)]}))
             for i in range(requests)] for c in range(clients)]


MIXES = ("uniform", "chat")


def completion_lengths(count: int, mix: str, rng: np.random.Generator) -> np.ndarray:
    """max_tokens per request: "uniform" 8..128; "chat" three in four short (8..32), one in four long
    (96..128), as answers to a chat are mostly short."""
    if mix == "uniform":
        return rng.integers(8, 129, size=count)
    long = rng.random(count) < 0.25
    return np.where(long, rng.integers(96, 129, size=count), rng.integers(8, 33, size=count))


def static_share(lengths: np.ndarray, group: int, draws: int = 2000, seed: int = 0) -> float:
    """The share of a static group's slot-steps that decode a token: E[length] / E[longest of `group`].
    Even where a decode step cost the same for 1 and for `group` rows, continuous batching could beat
    static batching by at most its inverse."""
    rng = np.random.default_rng(seed)
    return float(lengths.mean() / rng.choice(lengths, size=(draws, group)).max(axis=1).mean())


def continuous_ceiling(lengths: np.ndarray, group: int, fixed_s: float, per_row_s: float) -> float:
    """Continuous over static batching at most, where a decode step of k sequences costs
    fixed_s + k * per_row_s: a static group of `group` pays a step per token of its longest sequence,
    continuous batching keeps every slot busy. per_row_s = 0 gives 1 / static_share."""
    mean = float(lengths.mean())
    longest = mean / static_share(lengths, group)
    decoded = group * mean * per_row_s  # the per-row cost of every token, the same for both
    return (longest * fixed_s + decoded) / (mean * fixed_s + decoded)


def step_costs(lm: str, slots: int, threads: int) -> dict:
    """A decode step's cost with 1 and with `slots` sequences (models/slots.py on one device, `threads`
    TF threads as a rank of the server has), from a process of its own."""
    from hvdinfer.bench import report

    spec = json.dumps({"lm": lm, "slots": slots, "threads": threads})
    return report.run_json("slot steps", report.worker_command(["--mode", "slot-steps", "--spec", spec]),
                           report.bench_env(), 600)


def slot_steps_worker(args) -> int:
    """`python -m hvdinfer.bench worker --mode slot-steps --spec JSON`: prints the median step of 1 and of
    all slots' sequences, in seconds, as one JSON line."""
    spec = json.loads(args.spec)
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(spec["threads"])
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from models import gpt_loading
    from models.decoding import SamplingParams
    from models.slots import GPTSlots, SlotDecoder

    model, tokenizer, _ = gpt_loading.load_gpt(Path(spec["lm"]))
    prompt = tokenizer.encode("Hello world, this is")
    costs = {}
    for rows in (1, spec["slots"]):
        decoder = SlotDecoder(GPTSlots(model, spec["slots"]), tokenizer)
        params = SamplingParams(max_new_tokens=60, ignore_eos=True)
        decoder.admit([(i, prompt, params, i) for i in range(rows)])
        times = []
        for _ in range(45):
            start = time.perf_counter()
            decoder.step()
            times.append(time.perf_counter() - start)
        costs[f"step_{rows}_s"] = float(np.median(times[5:]))
    print(json.dumps(costs), flush=True)
    return 0


def completions_load(clients: int, requests: int, seed: int = 0, mix: str = "uniform"):
    rng = np.random.default_rng(seed)
    prompts = short_texts(clients * requests, seed + 1)
    lengths = completion_lengths(clients * requests, mix, rng)
    return [[("/v1/completions", _body({"model": "lm", "prompt": prompts[c * requests + i], "temperature": 0,
                                        "max_tokens": int(lengths[c * requests + i]), "ignore_eos": True}))
             for i in range(requests)] for c in range(clients)]


def offline_infer(model: str, np_: int, texts: list[str], work: Path) -> float:
    """`hvdinfer infer` over the same texts on the same ranks: its compute records/s."""
    from hvdinfer.bench import report

    src = work / "texts.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    metrics = work / f"infer-np{np_}.json"
    out = report.fresh_output(work / f"infer-np{np_}.npy")
    cmd = report.mpirun_prefix(np_) + [str(Path(sys.executable).with_name("hvdinfer")), "infer", "--model", model,
                                       "--input", str(src), "--output", str(out), "--no-journal", "--quiet",
                                       "--metrics-json", str(metrics)]
    proc = report.run_to_end(cmd, report.bench_env(), 1800)
    if proc.returncode:
        raise RuntimeError(f"hvdinfer infer failed:\n{proc.stderr[-2000:]}")
    return json.loads(metrics.read_text())["records_per_s"]


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _summary(name: str, result: dict) -> None:
    print(f"  {name:34s} {result['requests']:6d} requests, {result['errors']} errors, "
          f"{result['requests_per_s']:8.1f} req/s, p50 {result['p50_ms'] or 0:7.1f} ms, "
          f"p99 {result['p99_ms'] or 0:7.1f} ms" + (f", {result['tokens_per_s']:.0f} tokens/s"
                                                    if "tokens_per_s" in result else ""), flush=True)


def bench_serve(np_: int, out: Path, clients: int = 64, requests: int = 500, batch1_requests: int = 20,
                completion_requests: int = 20, embed_model: str = "minilm-l6", lm_model: str | None = None,
                limit_s: float = 900.0) -> dict:
    work = out / "serve-work"
    work.mkdir(parents=True, exist_ok=True)
    ranks = sorted({1, np_})
    texts = short_texts(clients * requests)
    embed_name = embed_model if "/" not in embed_model else Path(embed_model).name
    lm = lm_model or str(write_lm(work / "lm"))
    results: dict[str, dict] = {}
    load_before = os.getloadavg()[0]

    print(f"bench serve: {clients} clients; embeddings {requests} requests each, completions "
          f"{completion_requests} each; ranks {ranks}", flush=True)
    for n in ranks:
        offline = offline_infer(embed_model, n, texts, work)
        results[f"infer offline np{n}"] = {"requests_per_s": offline}
        print(f"  {'infer offline np' + str(n):34s} {offline:8.1f} records/s", flush=True)
        port = _port()
        # Two batches in hand per rank (the router's limit), so a rank has the next one while it computes.
        batch = str(max(1, clients // (2 * n)))
        with Served(embed_model, n, port, "--max-batch", batch, log=work / f"embed-np{n}.log"):
            result = drive(port, embeddings_load(embed_name, texts, clients, requests), limit_s)
        result.pop("bodies")
        results[f"embeddings np{n}"] = result
        _summary(f"embeddings np{n}", result)
    port = _port()
    with Served(embed_model, np_, port, "--max-batch", "1", log=work / "embed-batch1.log"):
        result = drive(port, embeddings_load(embed_name, texts, clients, batch1_requests), limit_s)
    result.pop("bodies")
    results[f"embeddings np{np_} max-batch 1"] = result
    _summary(f"embeddings np{np_} max-batch 1", result)

    runs = [(n, "continuous", "uniform") for n in ranks] + [(np_, "static", "uniform")]
    runs += [(np_, batching, "chat") for batching in ("continuous", "static")]
    for n, batching, mix in runs:
        port = _port()
        name = f"completions np{n} {batching}" + (f" {mix} mix" if mix != "uniform" else "")
        with Served(lm, n, port, "--max-batch", str(SLOTS), "--batching", batching,
                    log=work / f"lm-{n}-{batching}-{mix}.log"):
            result = drive(port, completions_load(clients, completion_requests, mix=mix), limit_s)
        tokens = sum(json.loads(b)["usage"]["completion_tokens"] for b in result.pop("bodies"))
        result.update(tokens=tokens, tokens_per_s=tokens / result["wall_s"])
        results[name] = result
        _summary(name, result)

    served, offline = results[f"embeddings np{np_}"], results[f"infer offline np{np_}"]
    ratios = {
        f"embeddings served/offline np{np_}": served["requests_per_s"] / offline["requests_per_s"],
        "embeddings batched vs max-batch 1": served["requests_per_s"]
        / results[f"embeddings np{np_} max-batch 1"]["requests_per_s"],
        # The most batching could give here: offline `infer` (length-sorted batches of 64, no HTTP)
        # over the same server answering one text per forward.
        "embeddings offline vs max-batch 1 (batching's ceiling)": offline["requests_per_s"]
        / results[f"embeddings np{np_} max-batch 1"]["requests_per_s"],
        "completions continuous/static": results[f"completions np{np_} continuous"]["tokens_per_s"]
        / results[f"completions np{np_} static"]["tokens_per_s"],
        "completions continuous/static, chat mix": results[f"completions np{np_} continuous chat mix"]["tokens_per_s"]
        / results[f"completions np{np_} static chat mix"]["tokens_per_s"],
    }
    rng = np.random.default_rng(0)
    lengths = {mix: completion_lengths(100_000, mix, rng) for mix in MIXES}
    # The ceilings of continuous over static batching for each mix: if a step cost the same for 1 and
    # for 16 sequences (the arithmetic one), and at this LM's measured step costs on one rank's threads.
    ceilings = {mix: 1 / static_share(lengths[mix], SLOTS) for mix in MIXES}
    steps = step_costs(lm, SLOTS, max(1, (os.cpu_count() or 1) // np_))
    per_row = (steps[f"step_{SLOTS}_s"] - steps["step_1_s"]) / (SLOTS - 1)
    costed = {mix: continuous_ceiling(lengths[mix], SLOTS, steps["step_1_s"] - per_row, per_row) for mix in MIXES}
    goals = {
        "embeddings served >= 0.8x offline": report_mod.goal(ratios[f"embeddings served/offline np{np_}"], ">=", 0.8),
        "embeddings batched >= 5x max-batch 1": report_mod.goal(ratios["embeddings batched vs max-batch 1"], ">=", 5),
        "completions continuous >= 2x static": report_mod.goal(ratios["completions continuous/static"], ">=", 2),
        "completions continuous >= 2x static, chat mix": report_mod.goal(
            ratios["completions continuous/static, chat mix"], ">=", 2),
        "zero errors": report_mod.goal(sum(r.get("errors", 0) for r in results.values()), "==", 0),
    }
    report = {"bench": "serve", "np": np_, "clients": clients, "requests_per_client": requests,
              "batch1_requests_per_client": batch1_requests, "completion_requests_per_client": completion_requests,
              "embed_model": embed_model, "lm": LM_CONFIG if lm_model is None else lm_model,
              "cores": os.cpu_count(), **report_mod.machine(), "load_average_1m": [load_before, os.getloadavg()[0]],
              "results": results, "ratios": ratios, "goals": goals, "continuous_over_static_ceiling": ceilings,
              "slot_step_s": steps, "continuous_over_static_ceiling_at_step_costs": costed}
    report_mod.print_ratios(ratios, 36)
    print("  continuous/static ceiling if a step cost the same for 1 and 16 rows: "
          + ", ".join(f"{mix} mix {c:.2f}x" for mix, c in ceilings.items()), flush=True)
    print(f"  a decode step here: {steps['step_1_s'] * 1000:.1f} ms for 1 sequence, "
          f"{steps[f'step_{SLOTS}_s'] * 1000:.1f} ms for {SLOTS}; continuous/static ceiling at these costs: "
          + ", ".join(f"{mix} mix {c:.2f}x" for mix, c in costed.items()), flush=True)
    report_mod.write_report(report, out, "serve", plot_serve)
    return report


def plot_serve(report: dict, path: Path) -> None:
    plt = report_mod.pyplot()
    results = report["results"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    embed = [n for n in results if n.startswith(("embeddings", "infer"))]
    bars = axes[0].barh(embed, [results[n]["requests_per_s"] for n in embed],
                        color=report_mod.bar_colors(["hvdinfer" if n.startswith("embeddings") else n for n in embed]))
    axes[0].bar_label(bars, fmt="%.0f")
    axes[0].set_xlabel("texts / s")
    axes[0].set_title(f"embeddings, {report['clients']} clients")
    gen = [n for n in results if n.startswith("completions")]
    bars = axes[1].barh(gen, [results[n]["tokens_per_s"] for n in gen], color="#dd8452")
    axes[1].bar_label(bars, fmt="%.0f")
    axes[1].set_xlabel("generated tokens / s")
    axes[1].set_title("completions: max_tokens 8..128, or the chat mix")
    timed = [n for n in results if results[n].get("p50_ms") is not None]
    y = np.arange(len(timed))
    axes[2].barh(y - 0.2, [results[n]["p50_ms"] for n in timed], 0.4, label="p50")
    axes[2].barh(y + 0.2, [results[n]["p99_ms"] for n in timed], 0.4, label="p99")
    axes[2].set_yticks(y, timed)
    axes[2].set_xscale("log")
    axes[2].set_xlabel("latency, ms")
    axes[2].legend()
    fig.suptitle(f"hvdinfer serve, {report['cpu_model']}, {report['cores']} cores, "
                 f"load {report['load_average_1m'][0]:.1f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
