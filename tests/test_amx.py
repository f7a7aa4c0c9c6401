"""The AMX tile kernels (csrc/cpu/amx_tiles.h, the tile path of csrc/cpu/bsr_linear_cpu.cpp).

On every CPU the kernels run over the scalar tile emulator (``CCTK_CPU_CAPABILITY=amx_emulated``,
in a subprocess: the capability is read once per process), so their packing, indexing, tails and
epilogues are checked against the PyTorch reference here and in CI; where the CPU has AMX the
same checks run on the hardware too. The capability guard: no level above what cpuid reports.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from cctk import _ext
from cctk.timing import cpu_flags

HAS_EXT = _ext.available()
pytestmark = pytest.mark.skipif(not HAS_EXT, reason="compiled extension not built")


CPU_HAS_AMX = {"amx_tile", "amx_bf16"} <= cpu_flags()

# Every case: the block-sparse forward with each epilogue, and the input gradient (the same tile
# kernel over the transposed index), against the fp32 reference of the bf16-rounded operands.
_SCRIPT = r"""
import json, sys
import torch, cctk
import torch.nn.functional as F
from cctk.ops.block_sparse import (bsr_linear_epilogue, bsr_to_dense, bsr_transpose_index, dense_to_bsr)
torch.manual_seed(0)
out = {"cap": torch.ops.cctk.cpu_capability(), "cases": []}
cases = json.loads(sys.argv[1])
for M, n_in, n_out, B, density, act, with_res, with_bias in cases:
    W = torch.randn(n_out, n_in)
    nbr, nbc = -(-n_out // B), -(-n_in // B)
    mask = torch.rand(nbr, nbc) < density
    mask[0, -1] = True  # the partial last input block is always exercised
    values, crow, col = dense_to_bsr(W, mask, B)
    # pad of partial blocks holds garbage: the kernel must never read it
    if n_in % B or n_out % B:
        full = dense_to_bsr(torch.full((nbr * B, nbc * B), float("nan")), mask, B)[0]
        keep = dense_to_bsr(torch.ones(n_out, n_in), mask, B)[0].bool()
        values = torch.where(keep, values, full)
    vb = values.bfloat16()
    x = torch.randn(M, n_in).bfloat16()
    b = torch.randn(n_out).bfloat16() if with_bias else None
    res = torch.randn(M, n_out).bfloat16() if with_res else None
    y = torch.ops.cctk.bsr_linear_epilogue(x, vb, crow, col, b, n_out, act, res, None)
    Wd = bsr_to_dense(torch.nan_to_num(vb.float(), nan=0.0), crow, col, n_out, n_in)
    ref = x.float() @ Wd.t() + (b.float() if b is not None else 0)
    if act == "gelu":
        ref = F.gelu(ref)
    if res is not None:
        ref = ref + res.float()
    # input gradient: g (M, out) @ W (out, in) through the transposed index
    g = torch.randn(M, n_out).bfloat16()
    ccol, row, perm = bsr_transpose_index(crow, col, nbc)
    dx = torch.ops.cctk.bsr_linear_backward_input(g, vb, ccol, row, perm, n_in)
    dref = g.float() @ Wd
    err = ((y.float() - ref).abs() / (ref.abs() + 1)).max().item() if y.numel() else 0.0
    derr = ((dx.float() - dref).abs() / (dref.abs() + 1)).max().item() if dx.numel() else 0.0
    out["cases"].append({"case": [M, n_in, n_out, B, density, act, with_res, with_bias], "err": err, "derr": derr,
                         "finite": bool(torch.isfinite(y).all() and torch.isfinite(dx).all()),
                         "shape": list(y.shape)})
print(json.dumps(out))
"""

CASES = [
    # M, in, out, B, density, activation, residual, bias
    [1, 64, 64, 16, 1.0, "none", False, True],
    [7, 70, 100, 16, 0.6, "gelu", True, True],
    [33, 128, 96, 32, 0.5, "none", True, False],
    [97, 200, 130, 32, 0.5, "gelu", False, True],
    [59, 256, 256, 64, 0.4, "gelu", True, True],
    [40, 97, 75, 64, 0.7, "none", False, True],
    [64, 33, 17, 16, 1.0, "gelu", True, True],
    [31, 129, 65, 32, 1.0, "none", True, True],
]


def _run(cap: str, script: str = _SCRIPT, cases=CASES) -> dict:
    """JSON printed by ``script`` (given ``cases``) in a process whose CPU level is ``cap``
    ("best": the CPU's own; the level is read once per process)."""
    env = dict(os.environ, CCTK_CPU_CAPABILITY=cap)
    if cap == "best":
        env.pop("CCTK_CPU_CAPABILITY")
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _check(result: dict) -> None:
    assert len(result["cases"]) == len(CASES)
    for c in result["cases"]:
        assert c["finite"], f"non-finite output (padding read?) in case {c['case']}"
        assert c["shape"] == [c["case"][0], c["case"][2]]
        # bf16 output rounding (2^-8 relative) plus bf16 GELU; the sums themselves are fp32
        assert c["err"] < 2e-2, c
        assert c["derr"] < 2e-2, c


def test_tile_kernels_over_the_emulator_match_the_reference():
    result = _run("amx_emulated")
    assert result["cap"].endswith("+amx_emulated") or result["cap"] == "amx", result["cap"]
    _check(result)


@pytest.mark.skipif(not CPU_HAS_AMX, reason="the CPU has no AMX: the emulator test above covers the kernel body")
def test_tile_kernels_on_the_hardware_match_the_reference():
    result = _run("best")
    assert result["cap"] == "amx", f"AMX CPU but capability {result['cap']} (tile permission refused?)"
    _check(result)


def test_capability_never_reports_amx_without_it():
    cap = _ext.cpu_capabilities()
    if not CPU_HAS_AMX:
        assert "amx" not in cap, cap
    # a cap below AMX is honoured everywhere, and never raises the level
    # (the avx2 and scalar caps are exercised by the capability tests of each op)
    for want, allowed in (("avx512_bf16", {"avx512_bf16", "avx512", "avx2", "scalar"}),):
        env = dict(os.environ, CCTK_CPU_CAPABILITY=want)
        proc = subprocess.run([sys.executable, "-c", "import torch, cctk; print(torch.ops.cctk.cpu_capability())"],
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() in allowed, (want, proc.stdout)


def test_info_names_the_level():
    info = _ext.info()
    assert info["cpu_capability"] == _ext.cpu_capabilities()
    assert info["cpu_capability"].split("+")[0] in ("amx", "avx512_bf16", "avx512", "avx2", "scalar")


_ATTN_SCRIPT = r"""
import json, sys
import torch, cctk
from cctk.ops.fused_attention import attention_ref
torch.manual_seed(0)
out = {"cap": torch.ops.cctk.cpu_capability(), "cases": []}
for B, H, Tq, Tk, D in json.loads(sys.argv[1]):
    # q, k, v as the model makes them: strided views of one (B, T, 3, H, D) tensor
    qkv = torch.randn(B, max(Tq, Tk), 3, H, D).bfloat16()
    q = qkv[:, :Tq, 0].transpose(1, 2)
    k, v = qkv[:, :Tk, 1].transpose(1, 2), qkv[:, :Tk, 2].transpose(1, 2)
    o = torch.ops.cctk.attention(q, k, v, None)
    ref = attention_ref(q.float(), k.float(), v.float())
    err = ((o.float() - ref).abs() / (ref.abs() + 1)).max().item()
    out["cases"].append({"case": [B, H, Tq, Tk, D], "err": err, "finite": bool(torch.isfinite(o).all()),
                         "shape": list(o.shape)})
print(json.dumps(out))
"""

ATTN_CASES = [  # B, H, Tq, Tk, d_h: T = 1, 7, 197, 257; d_h 16..128 (odd ones padded to 32)
    [1, 1, 1, 1, 16], [2, 2, 7, 7, 24], [1, 2, 197, 197, 64], [1, 1, 257, 257, 128], [2, 1, 33, 300, 40],
    [1, 3, 16, 16, 32], [1, 1, 5, 513, 96],
]


def _run_attention(cap: str) -> dict:
    return _run(cap, _ATTN_SCRIPT, ATTN_CASES)


def _check_attention(result: dict) -> None:
    assert len(result["cases"]) == len(ATTN_CASES)
    for c in result["cases"]:
        B, H, Tq, Tk, D = c["case"]
        assert c["finite"] and c["shape"] == [B, H, Tq, D], c
        assert c["err"] < 2e-2, c  # P rounded to bf16 for P V, output rounded to bf16


def test_tile_attention_over_the_emulator_matches_the_reference():
    result = _run_attention("amx_emulated")
    assert result["cap"].endswith("+amx_emulated") or result["cap"] == "amx", result["cap"]
    _check_attention(result)


@pytest.mark.skipif(not CPU_HAS_AMX, reason="the CPU has no AMX: the emulator test above covers the kernel body")
def test_tile_attention_on_the_hardware_matches_the_reference():
    result = _run_attention("best")
    assert result["cap"] == "amx", result["cap"]
    _check_attention(result)
