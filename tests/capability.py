"""Run a script under each CPU code path (``CCTK_CPU_CAPABILITY`` caps it) and collect its JSON."""
import json
import os
import subprocess
import sys


def results_per_capability(script: str, caps=("best", "avx512", "avx2", "scalar"), timeout: int = 300) -> dict:
    """{cap: json.loads(stdout of `python -c script` run with CCTK_CPU_CAPABILITY=cap)}; "best"
    leaves the variable unset (the best path the CPU has)."""
    out = {}
    for cap in caps:
        env = dict(os.environ)
        env.pop("CCTK_CPU_CAPABILITY", None)
        if cap != "best":
            env["CCTK_CPU_CAPABILITY"] = cap
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stderr
        out[cap] = json.loads(proc.stdout)
    return out
