"""`hvdinfer bench`: side-by-side ratios, measured in one run, written as JSON + PNG under --out.

    .venv/bin/hvdinfer bench [all|runtime|infer|finetune] --np 2 --out bench-out     # (make bench)

One module per bench (runtime, infer, finetune); report.py holds what they share (launching a
variant, the CPU model, the JSON + PNG report); `python -m hvdinfer.bench worker` runs one variant.
"""
