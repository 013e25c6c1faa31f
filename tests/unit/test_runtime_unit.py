"""Runtime pieces that need no Horovod: the thread plan and the failure line."""
import pytest

from hvdinfer import runtime
from hvdinfer.runtime import JobError, RuntimeConfig, thread_plan


@pytest.mark.parametrize("local_size, cores, want", [
    (1, 2, (2, 2)), (2, 2, (1, 1)), (3, 2, (1, 1)), (2, 16, (8, 1)), (4, 16, (4, 1)),
])
def test_thread_plan_splits_cores_across_local_ranks(local_size, cores, want):
    assert thread_plan(RuntimeConfig(), local_size, cores) == want


def test_thread_plan_overrides_and_untuned():
    assert thread_plan(RuntimeConfig(intra_op_threads=3, inter_op_threads=2), 2, 2) == (3, 2)
    assert thread_plan(RuntimeConfig(tuned=False), 2, 2) == (0, 0)


def test_failure_line_names_rank_type_and_message():
    line = runtime.failure_line(ValueError("bad\nthing"), 1, 2)
    assert line == "hvdinfer: rank 1 of 2 failed: ValueError: bad | thing"
    assert runtime.failure_line(JobError("no such file"), 0, 2) == "hvdinfer: error: no such file"


def test_launcher_rank_reads_the_launchers_env(monkeypatch):
    for var in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert runtime.launcher_rank() == 0
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    assert runtime.launcher_rank() == 3


# The start of a real /proc/cpuinfo (this project's 2-core AMD EPYC host), flags cut short.
CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 23
model name\t: AMD EPYC
flags\t\t: fpu vme de pse tsc msr avx avx2 fma sse4_2 sha_ni
bugs\t\t: sysret_ss_attrs

processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme de pse tsc msr avx avx2 fma sse4_2 sha_ni
"""
NO_BF16 = {"avx", "avx2", "avx512f", "avx512_vnni", "fma"}


def test_cpuinfo_parser_reads_the_flags_and_model_of_the_first_processor():
    assert runtime.cpuinfo_flags(CPUINFO) == {"fpu", "vme", "de", "pse", "tsc", "msr", "avx", "avx2", "fma",
                                              "sse4_2", "sha_ni"}
    assert runtime.cpuinfo_model(CPUINFO) == "AMD EPYC"
    arm = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\nCPU implementer\t: 0x41\n"
    assert runtime.cpuinfo_flags(arm) == {"fp", "asimd", "bf16", "i8mm"}
    assert runtime.cpuinfo_flags("") == set() and runtime.cpuinfo_model("") == "unknown"


@pytest.mark.parametrize("flags, gpus, want, why", [
    (NO_BF16, [], "fp32", "auto: CPU has neither amx_bf16 nor avx512_bf16, so bf16 would be emulated"),
    (NO_BF16 | {"avx512_bf16"}, [], "bf16", "auto: CPU has avx512_bf16"),
    (NO_BF16 | {"amx_bf16", "amx_tile"}, [], "bf16", "auto: CPU has amx_bf16"),
    (NO_BF16, [(8, 0)], "bf16", "auto: GPU compute capability 8.0 >= 8.0"),
    (NO_BF16, [(9, 0)], "bf16", "auto: GPU compute capability 9.0 >= 8.0"),
    (NO_BF16, [(7, 5)], "fp32", "auto: GPU compute capability 7.5 < 8.0"),
    # The GPU computes, so a bf16-capable host CPU does not count; every GPU must be native.
    (NO_BF16 | {"amx_bf16"}, [(7, 5)], "fp32", "auto: GPU compute capability 7.5 < 8.0"),
    (NO_BF16, [(8, 6), (7, 0)], "fp32", "auto: GPU compute capability 7.0 < 8.0"),
], ids=["no bf16 flags", "avx512_bf16", "amx_bf16", "gpu 8.0", "gpu 9.0", "gpu 7.5", "gpu 7.5 + amx cpu",
        "one old gpu"])
def test_auto_is_bf16_only_where_the_hardware_computes_it_natively(flags, gpus, want, why):
    precision, reason = runtime.choose_precision("auto", flags, gpus)
    assert precision == want
    assert reason.startswith(why)


@pytest.mark.parametrize("requested", ["fp32", "bf16"])
@pytest.mark.parametrize("flags, gpus", [(NO_BF16, []), (NO_BF16 | {"amx_bf16"}, []), (NO_BF16, [(8, 0)])])
def test_an_explicit_precision_is_honoured_on_any_hardware(requested, flags, gpus):
    precision, reason = runtime.choose_precision(requested, flags, gpus)
    assert precision == requested and reason.startswith("requested (")


def test_an_unknown_precision_is_refused():
    with pytest.raises(JobError, match="--precision must be one of auto, fp32, bf16, not 'fp16'"):
        runtime.choose_precision("fp16", set(), [])


def test_ranks_agree_on_one_precision():
    native = ("bf16", "auto: CPU has amx_bf16", True)
    emulated = ("fp32", "auto: CPU has neither amx_bf16 nor avx512_bf16", False)
    assert runtime.agree_precision([native, native]) == ("bf16", "auto: CPU has amx_bf16")
    assert runtime.agree_precision([native, emulated]) == ("fp32", emulated[1] + " on rank 1")
    assert runtime.agree_precision([emulated, native]) == ("fp32", emulated[1] + " on rank 0")
    forced = ("bf16", "requested (CPU has neither amx_bf16 nor avx512_bf16)", False)
    assert runtime.agree_precision([native[:1] + ("requested (CPU has amx_bf16)", True), forced])[0] == "bf16"


def test_resolve_precision_reads_this_hosts_cpuinfo(monkeypatch, tmp_path, caplog):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO.replace("sha_ni", "sha_ni avx512_bf16"))
    monkeypatch.setattr(runtime, "CPUINFO", cpuinfo)
    monkeypatch.setattr(runtime, "visible_gpu_capabilities", lambda: [])
    assert runtime.resolve_precision("auto") == ("bf16", "auto: CPU has avx512_bf16")
    cpuinfo.write_text(CPUINFO)
    assert runtime.resolve_precision("auto")[0] == "fp32"
    monkeypatch.setattr(runtime.LOG, "propagate", True)  # let caplog see the coordinator's lines
    with caplog.at_level("INFO", logger="hvdinfer"):
        assert runtime.resolve_precision("bf16")[0] == "bf16"
    assert any(r.levelname == "WARNING" and "lack native bf16" in r.getMessage() for r in caplog.records)


def test_exit_now_finishes_threads_and_atexit_handlers_then_exits_with_the_code(tmp_path):
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import atexit, concurrent.futures, threading, time
        from pathlib import Path
        from hvdinfer import runtime
        out = Path({str(tmp_path)!r})
        def late():
            time.sleep(0.3)
            (out / "thread").write_text("done")
        threading.Thread(target=late).start()
        pool = concurrent.futures.ThreadPoolExecutor(1)  # left open: its worker must not hold the exit
        pool.submit(lambda: None).result()
        atexit.register(lambda: (out / "atexit").write_text(str((out / "thread").exists())))
        print("last line", flush=False)
        runtime.exit_now(3)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "last line\n"  # flushed before the process ended
    assert (tmp_path / "thread").read_text() == "done"
    assert (tmp_path / "atexit").read_text() == "True"  # handlers run after the threads are joined
