"""Distributed text generation: many prompts in, one continuation per prompt out, complete and in
input order, resumable after any crash; the same job engine as `hvdinfer infer`.

    mpirun -np 2 --oversubscribe --bind-to none .venv/bin/hvdinfer generate \
        --model runs/lm/model --input prompts.jsonl --output out.jsonl --max-new-tokens 64 --seed 1
    ... after a crash, the same command with --resume computes only what is missing.

The data path, top-down:
  index + check (coordinator, tasks/text_job) -> journal -> schedule (chunks of prompts on demand)
  -> prepare (any rank, helper thread: parse, tokenise, left-truncate a prompt that leaves no room
  for --max-new-tokens, sort by length, cut into batches)
  -> generate (models/decoding: one prefill, then one compiled step per new token against the
  KV cache; sampling on the host, each prompt's random stream from (seed, prompt index))
  -> journal -> write (coordinator: `{"index", "id", "text", "tokens", "finish_reason"}` per prompt,
  in input order, .jsonl or .parquet).
A prompt's continuation depends on its own tokens, the seed and its index alone, so any rank may
compute it: outputs are identical for any number of ranks, either schedule and after a resume.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from hvdinfer import collect, output, runtime
from hvdinfer.data import chunks
from hvdinfer.engine import job, journal as journal_mod, runner, watchdog
from hvdinfer.engine.journal import ChunkResult
from hvdinfer.runtime import JobError
from hvdinfer.tasks import text_job

LOG = runtime.LOG
MAX_AUTO_CHUNK = 256  # a generated record costs ~100x an embedded one: smaller chunks keep ranks balanced
FINISH_REASONS = ("length", "stop", "eos")


@dataclasses.dataclass(frozen=True)
class GenerateConfig(text_job.TextJobConfig):
    """One `hvdinfer generate` job (the fields every text job takes: text_job.TextJobConfig)."""

    model: str
    """A GPT-2-layout model directory (config.json, model.safetensors, tokenizer files)."""
    output: Path
    """.jsonl (one line per prompt) or .parquet, in input order."""
    batch_size: int = 16
    """Prompts decoded together."""
    text_field: str = "prompt"
    """Field (JSONL) or column (CSV/TSV) holding the prompt."""
    chunk_size: int = 0
    """Prompts per chunk (a multiple of 64); 0 = about 1/128 of the input, at most 256."""
    max_new_tokens: int = 64
    """Tokens generated per prompt at most."""
    temperature: float = 1.0
    """0 = greedy; otherwise logits are divided by it before sampling."""
    top_k: int = 0
    """Sample among the k most likely tokens only; 0 = all."""
    top_p: float = 1.0
    """Sample among the smallest set of tokens whose probability reaches p; 1 = all."""
    seed: int = 0
    """Each prompt's random stream derives from (seed, prompt index): the same for any ranks."""
    stop: tuple[str, ...] = ()
    """Stop a continuation where it first contains one of these strings (cut before it)."""
    ignore_eos: bool = False
    """Generate past the end-of-text token: every continuation runs to max_new_tokens or a stop string."""
    kv_cache: bool = True
    """False: recompute the whole sequence for every new token (slow; the bench's baseline)."""

    OUTPUT_SUFFIXES = (".jsonl", ".parquet")
    def __post_init__(self):
        super().__post_init__()
        self.sampling()  # invalid sampling values fail here, before any compute

    def sampling(self):
        from models import decoding

        try:
            return decoding.SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                           top_k=self.top_k, top_p=self.top_p, seed=self.seed,
                                           stop=tuple(self.stop), ignore_eos=self.ignore_eos)
        except (TypeError, ValueError) as exc:
            raise JobError(str(exc)) from None


# --- model ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Loaded:
    model: Any
    tokenizer: Any
    context: int
    """Positions the model has: prompt + new tokens must fit."""
    model_dir: Path


def load_model(cfg: GenerateConfig, precision: str) -> Loaded:
    """Load the GPT-2-layout directory, or raise a JobError that says why."""
    import tensorflow as tf

    from models import gpt_loading

    tf.keras.mixed_precision.set_global_policy("mixed_bfloat16" if precision == "bf16" else "float32")
    model_dir = text_job.resolve_model_dir(cfg.model)
    try:
        if cfg.parallel.enabled:
            from hvdinfer.parallel import parallelize

            model, tokenizer, config = parallelize.load_gpt(model_dir, cfg.parallel)
        else:
            model, tokenizer, config = gpt_loading.load_gpt(model_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise JobError(f"--model {cfg.model}: cannot load model: {exc}") from None
    if cfg.max_new_tokens >= config.n_positions:
        raise JobError(f"--max-new-tokens {cfg.max_new_tokens} leaves no room for a prompt in the model's "
                       f"context of {config.n_positions} tokens")
    return Loaded(model, tokenizer, config.n_positions, model_dir)


# --- the chunk task -------------------------------------------------------------------------------
@dataclasses.dataclass
class Prepared:
    chunk: chunks.Chunk
    records: list
    batches: list[tuple[list[int], list[list[int]]]]
    """(positions of the records in the chunk, their prompt tokens), longest prompts first."""
    truncated: np.ndarray


def prompt_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Positions cut into batches of similar prompt length (less padding), longest first."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


class PromptChunks(text_job.FileChunks):
    """`runner.ChunkTask` for prompts: bytes -> records -> token batches -> continuations."""

    def prepare(self, chunk_id: int, payload: tuple[chunks.Chunk, bytes]) -> Prepared:
        chunk, records, good = self.records(payload)
        room = self.loaded.context - self.cfg.max_new_tokens
        tokens = self.loaded.tokenizer.encode_batch_ids([records[i].text for i in good])
        truncated = np.zeros(len(records), bool)
        for i, ids in zip(good, tokens):
            truncated[i] = len(ids) > room
        tokens = [ids[-room:] for ids in tokens]  # left-truncation keeps the end, where generation continues
        batches = [([good[j] for j in rows], [tokens[j] for j in rows])
                   for rows in prompt_batches([len(t) for t in tokens], self.cfg.batch_size)]
        return Prepared(chunk, records, batches, truncated)

    def compute(self, prepared: Prepared) -> ChunkResult:
        from models import decoding

        chunk, records = prepared.chunk, prepared.records
        params = self.cfg.sampling()
        texts: list[str | None] = [None] * len(records)
        tokens: list[list[int] | None] = [None] * len(records)
        finish: list[str | None] = [None] * len(records)
        for number, (positions, prompts) in enumerate(prepared.batches):
            what = f"generating chunk {chunk.id}, batch {number + 1} of {len(prepared.batches)}"
            watchdog.beat(what)
            generations = decoding.generate_batch(
                self.loaded.model, self.loaded.tokenizer, prompts, [chunk.first_record + p for p in positions],
                params, use_cache=self.cfg.kv_cache, on_step=lambda step: watchdog.beat(f"{what}, token {step}"))
            for position, generation in zip(positions, generations):
                texts[position], tokens[position] = generation.text, list(generation.tokens)
                finish[position] = generation.finish_reason
        new_tokens = np.array([len(t) if t is not None else 0 for t in tokens], np.int32)
        return ChunkResult(len(records), {"new_tokens": new_tokens, "truncated": prepared.truncated},
                           {"ids": [r.id for r in records], "errors": [r.error for r in records],
                            "texts": texts, "tokens": tokens, "finish_reasons": finish})


# --- output ---------------------------------------------------------------------------------------
def output_schema():
    import pyarrow as pa

    return output.record_schema(("text", pa.string()), ("tokens", pa.list_(pa.int32())),
                                ("finish_reason", pa.string()))


def output_block(first: int, result: ChunkResult) -> dict:
    meta = result.meta
    return {"index": np.arange(first, first + result.records), "id": meta["ids"], "text": meta["texts"],
            "tokens": meta["tokens"], "finish_reason": meta["finish_reasons"], "error": meta["errors"]}


def write_output(cfg: GenerateConfig, journal, plan: list[chunks.Chunk], computed: set[int]) -> dict:
    """Stream the journal's chunks into the output in input order; the counts it saw on the way
    (`tokens_computed`: the new tokens of the chunks this run computed, not reused ones)."""
    counts = {"skipped": 0, "truncated": 0, "new_tokens": 0, "tokens_computed": 0,
              **{f"finish_{r}": 0 for r in FINISH_REASONS}}
    with output.open_output(cfg.output, output_schema()) as out:
        for chunk in plan:
            watchdog.beat(f"writing chunk {chunk.id} of {len(plan)} to {cfg.output}")
            result = journal.read(chunk.id)
            counts["skipped"] += sum(e is not None for e in result.meta["errors"])
            counts["truncated"] += int(result.arrays["truncated"].sum())
            counts["new_tokens"] += int(result.arrays["new_tokens"].sum())
            if chunk.id in computed:
                counts["tokens_computed"] += int(result.arrays["new_tokens"].sum())
            for reason in result.meta["finish_reasons"]:
                if reason is not None:
                    counts[f"finish_{reason}"] += 1
            out.write_block(output_block(chunk.first_record, result))
    return counts


# --- the job --------------------------------------------------------------------------------------
def job_identity(cfg: GenerateConfig, index: chunks.InputIndex, chunk_size: int, precision: str,
                 loaded: Loaded) -> dict:
    """Everything that changes a chunk's result: a resume must match it exactly."""
    return {"task": "generate", "model": cfg.model, "model_sha256": text_job.model_digest(loaded.model_dir),
            "input": index.identity(), "chunk_size": chunk_size, "batch_size": cfg.batch_size,
            "precision": precision, "text_field": cfg.text_field, "id_field": cfg.id_field,
            "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_k": cfg.top_k,
            "top_p": cfg.top_p, "seed": cfg.seed, "stop": list(cfg.stop), "kv_cache": cfg.kv_cache,
            # Only when set, so a journal written before the flag existed still resumes.
            **({"ignore_eos": True} if cfg.ignore_eos else {}), **cfg.parallel.identity()}


def run(cfg: GenerateConfig, runtime_config: runtime.RuntimeConfig) -> dict:
    engine = job.start(runtime_config, cfg.stall_timeout)
    rt = engine.rt
    start = time.perf_counter()
    precision, precision_reason = runtime.resolve_precision(cfg.precision, collect.allgather_json)
    with watchdog.quiet("loading the model"):
        loaded = load_model(cfg, precision)
    index, plan, chunk_size = text_job.plan_job(cfg, rt, engine.link, MAX_AUTO_CHUNK)
    identity = job_identity(cfg, index, chunk_size, precision, loaded) if rt.is_coordinator else {}
    computed = text_job.run_chunks(cfg, engine, index, plan, chunk_size, PromptChunks(cfg, index, plan, loaded),
                                   identity, "generate", cfg.schedule, precision, loaded.model)
    summary = None
    if rt.is_coordinator:
        counts = write_output(cfg, computed.journal, plan, set(computed.todo))
        text_job.close_journal(cfg, computed)
        ok = index.records - counts["skipped"]
        tokens_per_s = counts["tokens_computed"] / computed.seconds if computed.seconds else 0.0
        summary = text_job.finish(
            cfg, computed, plan, chunk_size, rt.size, (precision, precision_reason), start,
            {"prompts": index.records, "ok": ok, **counts, "kv_cache": cfg.kv_cache,
             "prompts_per_s": computed.records_per_s, "tokens_per_s": tokens_per_s},
            f"generate: {index.records} prompts -> {cfg.output}: ok {ok}, skipped {counts['skipped']}, truncated "
            f"{counts['truncated']}; {counts['new_tokens']} new tokens (length {counts['finish_length']}, stop "
            f"{counts['finish_stop']}, eos {counts['finish_eos']}); {tokens_per_s:.1f} new tokens/s on "
            f"{rt.size} rank(s)")
    return runner.finish(engine.link, rt.rank, rt.size, summary)


# --- the Python API -------------------------------------------------------------------------------
def _api_row(row: dict, source: Path) -> dict:
    """An output line as the API returns it: no index or id, an error naming the list position."""
    if "error" in row:
        return {"error": row["error"].replace(f"{source}:{row['index'] + 1}: field 'prompt'", f"prompts[{row['index']}]")}
    return {key: row[key] for key in ("text", "tokens", "finish_reason")}


def write_prompts(path: Path, prompts: list[str]) -> None:
    output.write_jsonl(path, ({"prompt": prompt} for prompt in prompts))


def generate_texts(model: str | Path, prompts: list[str], *, output: str | Path | None = None,
                   resume: bool = False, progress: bool = True, **settings) -> list[dict] | Path:
    """`hvdinfer.generate`: continue every prompt over all ranks; every rank passes the same prompts.

    Returns, on every rank, one dict per prompt in input order: {"text", "tokens", "finish_reason"}
    (or {"error"} for an empty prompt). With `output` (.jsonl or .parquet) the results are streamed
    there and journaled beside it (`resume=True` continues an interrupted call), and the output's
    Path is returned instead. `settings` are GenerateConfig fields: max_new_tokens, temperature,
    top_k, top_p, seed, stop, batch_size, kv_cache, schedule, chunk_size, stall_timeout, on_error.
    """
    import tempfile

    engine = job.start()
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise JobError("generate: prompts must be a list of strings")
    if not prompts:
        raise JobError("generate: no prompts")
    unknown = set(settings) - {f.name for f in dataclasses.fields(GenerateConfig)} | (
        set(settings) & {"model", "input", "output", "resume", "journal", "quiet", "text_field", "id_field"})
    if unknown:
        raise JobError(f"generate: unknown or fixed setting(s): {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory(prefix="hvdinfer-generate-") as scratch:
        target = Path(output) if output is not None else Path(scratch) / "out.jsonl"
        # The prompts file lives in the journal directory when there is one, so a resumed call finds
        # the same input (same bytes, same identity) and the finished job removes it with the journal.
        source = (journal_mod.journal_dir(target) if output is not None else Path(scratch)) / "prompts.jsonl"
        if engine.rt.is_coordinator:
            source.parent.mkdir(parents=True, exist_ok=True)
            write_prompts(source, prompts)
        cfg = GenerateConfig(model=str(model), input=source, output=target, resume=resume, journal=output is not None,
                             quiet=not progress, **{"on_error": "skip", **settings})
        run(cfg, None)
        if output is not None:
            return target
        rows = None
        if engine.rt.is_coordinator:
            rows = [_api_row(json.loads(line), source) for line in target.read_text(encoding="utf-8").splitlines()]
        return runner.finish(engine.link, engine.rt.rank, engine.rt.size, rows)
