"""cctk.timing: the interleaved-rounds harness every throughput figure comes from."""
import pytest
import torch

from cctk.timing import cpu_model, images_per_s, interleaved_times, models_images_per_s, timing_machine


def test_interleaved_order_and_counts():
    calls = []
    times = interleaved_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, warmup=1,
                              shuffle=False)
    assert calls == ["a", "b"] * 4  # one warm-up round, then rounds interleaved a, b, a, b, ...
    assert set(times) == {"a", "b"} and all(len(v) == 3 and min(v) >= 0 for v in times.values())
    assert images_per_s([0.5, 0.25, 1.0], 8) == 32.0


def test_shuffled_rounds_vary_who_runs_after_whom():
    """Default: every timed round runs each provider once, in a fresh seeded order, so that each
    provider follows different providers across rounds (a spinning runtime slows whoever is next)."""
    def run(seed):
        calls = []
        fns = {k: (lambda k=k: calls.append(k)) for k in "abcde"}
        times = interleaved_times(fns, rounds=20, warmup=1, seed=seed)
        assert all(len(v) == 20 for v in times.values())
        return calls
    calls = run(0)
    assert calls[:5] == list("abcde")   # the warm-up round: given order
    rounds = [calls[5 + 5 * r: 10 + 5 * r] for r in range(20)]
    assert all(sorted(r) == list("abcde") for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1
    before_a = {r[r.index("a") - 1] for r in rounds if r.index("a") > 0}
    assert len(before_a) >= 2
    assert run(0) == calls and run(1) != calls   # seeded


def test_models_images_per_s_and_bad_input():
    lin = torch.nn.Linear(8, 4)
    out = models_images_per_s({"lin": lin, "seq": torch.nn.Sequential(lin, torch.nn.ReLU())}, torch.randn(16, 8),
                              rounds=2)
    assert set(out) == {"lin", "seq"} and out["lin"]["batch"] == 16 and out["lin"]["images_per_s"] > 0
    with pytest.raises(ValueError, match="at least one provider"):
        interleaved_times({})
    with pytest.raises(ValueError, match="positive int"):
        interleaved_times({"a": lambda: None}, rounds=0)


def test_timing_machine_names_the_cpu_and_threads():
    name = cpu_model()
    assert isinstance(name, str) and name.strip()
    assert timing_machine() == f"{name}, {torch.get_num_threads()} threads"
    assert timing_machine("cpu") == timing_machine()
