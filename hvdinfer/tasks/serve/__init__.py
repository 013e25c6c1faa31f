"""`hvdinfer serve`: an OpenAI-compatible HTTP server on the coordinator, every rank computing.

    mpirun -np 2 --oversubscribe --bind-to none .venv/bin/hvdinfer serve --model minilm-l6 --port 8000
    mpirun -np 2 --oversubscribe --bind-to none .venv/bin/hvdinfer serve --model runs/lm/model \
        --max-batch 16 --api-key "$KEY"

The data path, top-down:
  HTTP (app.py, rank 0's uvicorn thread: auth, body limit, typed request, model check, prompt
  checked against the context) -> router (router.py, rank 0's router thread: texts batched up to
  --max-batch or --max-wait-ms; sequences placed on the least-loaded rank's slots)
  -> ranks (ranks.py, every rank's main thread: the model over a text batch, or one decode
  iteration over the rank's active sequences: iteration-level batching)
  -> router (results and new tokens back to their requests) -> HTTP (JSON, or server-sent events).

Files: protocol.py (request/response/error shapes), app.py (one handler per endpoint), router.py
(batcher), ranks.py (what each rank runs), served.py (the model on a rank), metrics.py, server.py
(start, health, faults, shutdown).
"""
from hvdinfer.tasks.serve.server import ServeConfig, run

__all__ = ["ServeConfig", "run"]
