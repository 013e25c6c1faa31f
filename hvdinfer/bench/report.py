"""What every bench shares: launching a variant (mpirun or one process), the host's CPU model, and
the report (JSON + PNG under --out)."""
from __future__ import annotations

import json
import operator
import os
import shutil
import subprocess
import sys
from pathlib import Path

from hvdinfer import runtime

# Knobs a variant must not inherit from the caller's environment.
CLEAR_ENV = ("HOROVOD_CYCLE_TIME", "OMPI_MCA_mpi_yield_when_idle")


def mpirun_prefix(np_: int) -> list[str]:
    """Root-safe, oversubscribe-safe mpirun; binding off as horovodrun does."""
    exe = shutil.which("mpirun")
    if exe is None:
        raise RuntimeError("mpirun not found: run `make install`")
    forward = [arg for var in ("PYTHONPATH", "TF_CPP_MIN_LOG_LEVEL", "HVDINFER_CACHE") if var in os.environ
               for arg in ("-x", var)]
    return [exe, "-np", str(np_), "--oversubscribe", "--bind-to", "none", *forward]


def bench_env(**extra: str) -> dict:
    """The caller's environment, root-safe for mpirun, quiet TF, less the knobs a variant sets itself."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    for key in CLEAR_ENV:
        env.pop(key, None)
    env.update(extra)
    return env


def worker_command(flags: list[str]) -> list[str]:
    """`python -m hvdinfer.bench worker FLAGS` with this interpreter."""
    return [sys.executable, "-m", "hvdinfer.bench", "worker", *flags]


def run_to_end(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run with output captured; past `timeout` seconds stop it with SIGTERM (mpirun passes it on to
    every rank, where a SIGKILL of mpirun would leave them running), then SIGKILL, and raise."""
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                out, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            raise RuntimeError(f"{' '.join(cmd[:8])} ... ran past {timeout:g} s and was stopped:\n{err[-2000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_json(name: str, cmd: list[str], env: dict, timeout: float) -> dict:
    """Run one variant; its result is the last JSON line it printed."""
    proc = run_to_end(cmd, env, timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"bench variant {name} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def fresh_output(path: Path) -> Path:
    """`path` with no earlier output or journal (OUT.parts/) left by an interrupted bench."""
    shutil.rmtree(path.with_name(path.name + ".parts"), ignore_errors=True)
    path.unlink(missing_ok=True)
    return path


def machine(precision: str = "auto") -> dict:
    """The host's CPU model and what `--precision` resolves to on it (bench JSON fields)."""
    cpuinfo = runtime.read_cpuinfo()
    chosen, why = runtime.choose_precision(precision, runtime.cpuinfo_flags(cpuinfo),
                                           runtime.visible_gpu_capabilities())
    return {"cpu_model": runtime.cpuinfo_model(cpuinfo), "precision": chosen, "precision_reason": why}


COMPARISONS = {">=": operator.ge, "<=": operator.le, "==": operator.eq}


def goal(value, comparison: str, bound, **extra) -> dict:
    """A goal's entry in a report: the measured value, the bound as text, and whether it holds."""
    shown = f"{bound:g}" if isinstance(bound, float) else str(bound)
    return {"value": value, "goal": f"{comparison} {shown}", **extra, "met": bool(COMPARISONS[comparison](value, bound))}


def print_ratios(ratios: dict, width: int = 18) -> None:
    print("ratios:")
    for key, value in ratios.items():
        print(f"  {key:{width}s} {value:.2f}x")


def write_report(report: dict, out: Path, name: str, plot=None) -> None:
    """out/NAME.json (atomic) and out/NAME.png; `plot(report, path)` overrides the default bar chart."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, path)
    (plot or plot_report)(report, out / f"{name}.png")
    print(f"wrote {path} and {out / f'{name}.png'}")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_colors(names: list[str]) -> list[str]:
    """Every hvdinfer variant highlighted."""
    return ["#dd8452" if n.startswith("hvdinfer") else "#4c72b0" for n in names]


def plot_report(report: dict, path: Path) -> None:
    plt = pyplot()
    names = list(report["results"])
    values = [report["results"][n]["records_per_s"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bars = ax.bar(names, values, color=bar_colors(names))
    ax.bar_label(bars, fmt="%.1f")
    ax.set_ylabel("records / s")
    ax.set_title(f"{report['bench']}: {report['model_size']}, seq {report['seq']}, "
                 f"{report['np']} ranks, {report['cores']} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
