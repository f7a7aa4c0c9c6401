"""cctk.tune (measured choices, cached per machine) and cctk.optimize's tuning: never a slower
path than the best one this CPU has, the same function whichever path is chosen."""
import json
import os
import time

import pytest
import torch

import cctk
from cctk import _ext, tune
from cctk.models import create_model
from cctk.timing import cpu_flags


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CCTK_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("CCTK_TUNE", raising=False)
    # these tests check what is cached, whatever else the machine runs meanwhile (the load rule
    # has its own tests below)
    monkeypatch.setattr(tune, "BUSY_LIMIT", 1.0)
    tune.forget()
    yield tmp_path
    tune.forget()


def _counting(monkeypatch):
    calls = []
    real = tune.interleaved_times

    def counted(fns, **kw):
        calls.append(sorted(fns))
        return real(fns, **kw)

    monkeypatch.setattr(tune, "interleaved_times", counted)
    return calls


def test_choose_picks_the_fastest_and_remembers_it(cache_dir, monkeypatch):
    calls = _counting(monkeypatch)
    cands = {"slow": lambda: time.sleep(0.02), "fast": lambda: time.sleep(0.001)}
    assert tune.choose("demo", "sig-1", cands) == "fast"
    assert calls, "the first choice must be measured"
    saved = json.loads((cache_dir / "tune.json").read_text())
    assert saved[tune.machine_key()]["demo | sig-1"] == "fast"
    calls.clear()
    tune.forget()  # a new process: the file answers
    assert tune.choose("demo", "sig-1", cands) == "fast"
    assert calls == []


class _Loaded:
    """An OtherLoad that reports a fixed share of the CPUs used by other processes."""

    def __init__(self, fraction):
        self.fraction = fraction

    def __call__(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def test_a_choice_measured_under_load_is_used_but_not_cached(cache_dir, monkeypatch):
    monkeypatch.setattr(tune, "BUSY_LIMIT", 0.25)
    monkeypatch.setattr(tune, "OtherLoad", _Loaded(0.6))
    calls = _counting(monkeypatch)
    cands = {"slow": lambda: time.sleep(0.02), "fast": lambda: time.sleep(0.001)}
    with pytest.warns(RuntimeWarning, match="60% of the CPUs.*not cached"):
        assert tune.choose("demo", "sig-load", cands) == "fast"
    assert not (cache_dir / "tune.json").exists()
    calls.clear()
    assert tune.choose("demo", "sig-load", cands) == "fast"   # this process keeps it
    assert calls == []
    tune.forget()   # a new process on a quiet machine measures again, and caches
    monkeypatch.setattr(tune, "OtherLoad", _Loaded(0.05))
    assert tune.choose("demo", "sig-load", cands) == "fast"
    assert calls, "a choice not cached must be measured again by the next process"
    assert json.loads((cache_dir / "tune.json").read_text())[tune.machine_key()]["demo | sig-load"] == "fast"


def test_other_load_subtracts_this_process(monkeypatch):
    """The machine busy 3 of 4 CPU-seconds, 1 of them this process's: others used half."""
    from cctk import timing
    machine = iter([(10.0, 100.0), (13.0, 104.0)])     # (busy, total) CPU seconds
    own = iter([5.0, 6.0])
    wall = iter([0.0, 2.0])
    monkeypatch.setattr(timing, "_cpu_times", lambda: next(machine))
    monkeypatch.setattr(timing.time, "process_time", lambda: next(own))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(wall))
    with timing.OtherLoad() as load:
        pass
    assert load.fraction == pytest.approx(0.5)


def test_other_load_sees_processes_spinning_on_every_cpu():
    import subprocess
    import sys
    from cctk import timing
    if timing._cpu_times() is None:
        pytest.skip("no /proc/stat on this platform: OtherLoad reports None (next test)")
    n = os.cpu_count() or 1
    spin = "import time\nt=time.perf_counter()\nwhile time.perf_counter()-t<1.5: pass\n"
    procs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(n)]
    try:
        time.sleep(0.3)
        with timing.OtherLoad() as busy:
            time.sleep(0.6)
    finally:
        for p in procs:
            p.wait()
    assert busy.fraction is not None and busy.fraction > 0.5, busy.fraction


def test_other_load_without_proc_stat_is_none(monkeypatch):
    from cctk import timing
    monkeypatch.setattr(timing, "_cpu_times", lambda: None)
    with timing.OtherLoad() as load:
        time.sleep(0.06)
    assert load.fraction is None


def test_a_much_slower_candidate_runs_once(cache_dir, monkeypatch):
    runs = {"slow": 0, "fast": 0}

    def make(name, s):
        def f():
            runs[name] += 1
            time.sleep(s)
        return f

    assert tune.choose("demo", "sig-2", {"slow": make("slow", 0.05), "fast": make("fast", 0.001)}) == "fast"
    assert runs == {"slow": 1, "fast": 1}  # dropped after one run; a lone survivor needs no rounds


def test_tuning_off_takes_the_default_without_measuring(cache_dir, monkeypatch):
    monkeypatch.setenv("CCTK_TUNE", "0")
    calls = _counting(monkeypatch)
    assert tune.choose("demo", "sig-3", {"a": lambda: time.sleep(0.01), "b": lambda: None}) == "a"
    assert calls == []


def test_corrupt_cache_is_ignored_with_a_warning_and_rewritten(cache_dir):
    (cache_dir / "tune.json").write_text("{not json")
    with pytest.warns(RuntimeWarning, match="ignoring the tuning cache"):
        assert tune.choose("demo", "sig-4", {"a": lambda: time.sleep(0.01), "b": lambda: None}) == "b"
    assert json.loads((cache_dir / "tune.json").read_text())[tune.machine_key()]["demo | sig-4"] == "b"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_cache_dir_keeps_choices_in_memory(cache_dir):
    os.chmod(cache_dir, 0o500)
    try:
        assert tune.choose("demo", "sig-5", {"a": lambda: time.sleep(0.01), "b": lambda: None}) == "b"
        assert tune.cached("demo", "sig-5") == "b"
        assert not (cache_dir / "tune.json").exists()
    finally:
        os.chmod(cache_dir, 0o700)


def test_read_only_cache_file_keeps_choices_in_memory(cache_dir, monkeypatch):
    target = cache_dir / "sub"
    target.write_text("")  # a file where the cache directory should be: makedirs fails
    monkeypatch.setenv("CCTK_CACHE_DIR", str(target))
    tune.forget()
    with pytest.warns(RuntimeWarning, match="ignoring the tuning cache"):
        assert tune.choose("demo", "sig-6", {"a": lambda: time.sleep(0.01), "b": lambda: None}) == "b"
    assert tune.cached("demo", "sig-6") == "b"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tuned_model_is_the_same_function(cache_dir, dtype):
    torch.manual_seed(0)
    m = create_model("cct_2_3x1_8", num_classes=10, in_channels=1).eval()
    x = torch.randn(5, 1, 8, 8)
    fast = cctk.optimize(m, dtype=dtype, sample_input=x)
    tuned = fast._cctk_optimized["tuned"]
    assert len(tuned["blocks"]) == len(m.classifier.blocks)
    with torch.no_grad():
        y, ref = fast(x), m(x)
    assert y.dtype == dtype
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(y.float(), ref, **tol)
    # the second optimize of the same model reads every choice from the cache
    again = cctk.optimize(m, dtype=dtype, sample_input=x)
    assert again._cctk_optimized["tuned"] == tuned


@pytest.mark.skipif(not _ext.available(), reason="compiled extension not built")
@pytest.mark.skipif(bool({"avx512_bf16", "amx_bf16"} & cpu_flags()), reason="the CPU has bf16 units")
def test_bf16_on_a_cpu_without_bf16_units_computes_in_fp32(cache_dir):
    """torch's bf16 GEMMs on an AVX2-only CPU run ~500x slower than fp32: the tuned model must not use them."""
    torch.manual_seed(0)
    m = create_model("cct_2_3x2_32", num_classes=10).eval()
    x = torch.randn(8, 3, 32, 32)
    fast = cctk.optimize(m, dtype=torch.bfloat16, sample_input=x)
    assert fast._cctk_optimized["tuned"]["compute_dtype"] == "float32"
    with torch.no_grad():
        y = fast(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), m(x), atol=5e-2, rtol=5e-2)


def test_optimize_rejects_a_bad_sample(cache_dir):
    m = create_model("cct_2_3x1_8", num_classes=10, in_channels=1).eval()
    with pytest.raises(TypeError, match="sample_input"):
        cctk.optimize(m, dtype=torch.float32, sample_input=[1, 2])
    with pytest.raises(ValueError, match="channel"):
        cctk.optimize(m, dtype=torch.float32, sample_input=torch.randn(2, 3, 8, 8))
