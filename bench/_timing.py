"""Timing helper shared by the bench files (imported as a sibling module: pytest puts bench/ on
sys.path)."""
import statistics
import time


def inline_times(fn, rounds=5):
    """(median, min) seconds of ``rounds`` timed calls after one warm-up call: for a baseline
    that the session did not benchmark itself (e.g. when only one provider was selected)."""
    fn()
    ts = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), min(ts)
