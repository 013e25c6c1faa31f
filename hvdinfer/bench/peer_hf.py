"""The peer `hvdinfer bench generate` measures against: HF transformers `generate` (PyTorch, one process
on every core, its KV cache on) over the same GPT-2-layout directory and prompts. It runs under
.venv-peer's Python (`make peer-env`) and imports nothing from hvdinfer, so torch never becomes a
dependency of hvdinfer:

    .venv-peer/bin/python hvdinfer/bench/peer_hf.py generate MODEL_DIR IN.jsonl OUT.jsonl \
        --batch-size 16 --max-new-tokens 32
    .venv-peer/bin/python hvdinfer/bench/peer_hf.py check MODEL_DIR IN.jsonl OUT.npz --prompts 4 --max-new-tokens 16

generate: the prompts of a JSONL file (field "prompt") in input order, in batches of --batch-size
(left-padded with end-of-text, as HF's docs do for decoder-only batches), greedy, exactly
--max-new-tokens each (min_new_tokens = max_new_tokens); writes {"index", "tokens"} per prompt and
prints one JSON line: wall-clock marks of each phase, token counts, threads and versions.

check: for the first --prompts prompts, one at a time: the greedy continuation and the logits of
a full forward pass over prompt + continuation, saved with np.savez (tokens_I, logits_I), so the
bench can compare them with hvdinfer's model on the same tokens.
"""
import time

STARTED = time.time()

import argparse  # noqa: E402 - the clock starts before any import
import json  # noqa: E402
import os  # noqa: E402


def read_prompts(path: str) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line)["prompt"] for line in fh if line.strip()]


def load(model_dir: str):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


def generate(args) -> dict:
    import torch
    import transformers

    imported = time.time()
    model, tokenizer = load(args.model_dir)
    loaded = time.time()
    texts = read_prompts(args.input)
    read = time.time()
    rows, prompt_tokens = [], 0
    with torch.inference_mode():
        for start in range(0, len(texts), args.batch_size):
            batch = tokenizer(texts[start:start + args.batch_size], return_tensors="pt", padding=True)
            prompt_tokens += int(batch["attention_mask"].sum())
            out = model.generate(**batch, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.eos_token_id)
            rows += out[:, batch["input_ids"].shape[1]:].tolist()
    generated = time.time()
    tmp = args.output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        for index, tokens in enumerate(rows):
            fh.write(json.dumps({"index": index, "tokens": tokens}) + "\n")
    os.replace(tmp, args.output)
    written = time.time()
    new_tokens = sum(len(t) for t in rows)
    return {"started": STARTED, "imported": imported, "loaded": loaded, "read": read, "generated": generated,
            "written": written, "prompts": len(rows), "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
            "tokens_per_s": new_tokens / (generated - read), "torch_threads": torch.get_num_threads(),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}


def check(args) -> dict:
    import numpy as np
    import torch

    model, tokenizer = load(args.model_dir)
    arrays = {}
    with torch.inference_mode():
        for i, text in enumerate(read_prompts(args.input)[:args.prompts]):
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                 min_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
            arrays[f"tokens_{i}"] = out[0].numpy().astype(np.int32)
            arrays[f"prompt_length_{i}"] = np.int32(ids.shape[1])
            arrays[f"logits_{i}"] = model(out).logits[0].float().numpy()
    np.savez(args.output, **arrays)
    return {"prompts": args.prompts}


def main() -> int:
    parser = argparse.ArgumentParser(prog="peer_hf.py")
    parser.add_argument("mode", choices=["generate", "check"])
    parser.add_argument("model_dir")
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=4, help="check: how many prompts")
    args = parser.parse_args()
    print(json.dumps(generate(args) if args.mode == "generate" else check(args)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
