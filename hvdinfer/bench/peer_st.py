"""The peer `hvdinfer bench peer` measures against: the sentence-transformers recipe in one process
(HF transformers + PyTorch on every core). It runs under .venv-peer's Python (`make peer-env`) and
imports nothing from hvdinfer, so torch never becomes a dependency of hvdinfer:

    .venv-peer/bin/python hvdinfer/bench/peer_st.py MODEL_DIR IN.jsonl OUT.npy --batch-size 64 [--max-length 128]

It reads the texts of a JSONL file, runs `SentenceTransformer(MODEL_DIR).encode(texts, batch_size)`
(the directory's own modules: transformer, mean pooling, normalise), saves the embeddings with
np.save, and prints one JSON line: wall-clock marks of each phase and the versions it ran.
"""
import time

STARTED = time.time()

import argparse  # noqa: E402 - the clock starts before any import
import json  # noqa: E402
import os  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(prog="peer_st.py")
    parser.add_argument("model_dir")
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=0, help="tokens per text (default: the model's)")
    args = parser.parse_args()

    import numpy as np
    import sentence_transformers
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    imported = time.time()
    model = SentenceTransformer(args.model_dir, device="cpu")
    if args.max_length:
        model.max_seq_length = args.max_length
    loaded = time.time()
    with open(args.input, encoding="utf-8") as fh:
        texts = [json.loads(line)["text"] for line in fh if line.strip()]
    read = time.time()
    embeddings = model.encode(texts, batch_size=args.batch_size, convert_to_numpy=True, show_progress_bar=False)
    encoded = time.time()
    tmp = args.output + ".tmp.npy"
    np.save(tmp, embeddings.astype(np.float32))
    os.replace(tmp, args.output)
    written = time.time()
    print(json.dumps({
        "started": STARTED, "imported": imported, "loaded": loaded, "read": read, "encoded": encoded,
        "written": written, "records": len(texts), "records_per_s": len(texts) / (encoded - read),
        "max_seq_length": model.max_seq_length, "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "sentence-transformers": sentence_transformers.__version__}}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
