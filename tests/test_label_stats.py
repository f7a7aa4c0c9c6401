"""linear_label_stats / attention_label_stats (SCIENCE.md section 6): both backends against a
float64 reference written out here (explicit softmax, per-label masked sums), odd shapes, fp32 /
bf16 / fp16, pooled and token modes, non-contiguous inputs, absent labels, bad inputs, opcheck.

The Triton backend runs on CPU tensors under TRITON_INTERPRET=1 (set by conftest without a GPU).
"""
import math
import os
import subprocess
import sys

import pytest
import torch

from cctk.kernels import triton_available
from cctk.ops.label_stats import (attention_label_stats, attention_label_stats_ref,
                                  linear_label_stats, linear_label_stats_ref)

B, K = 3, 5
D_IN, D_OUT = 20, 37          # not multiples of any tile
H = 2
LABELS = [3, 0, 3]            # labels 1, 2, 4 absent

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
TRITON = triton_available()
BACKENDS = ["torch", "triton"]


def _skip_unrunnable(backend, device):
    if backend == "triton" and not TRITON:
        pytest.skip("triton is not installed (the torch backend is tested without it)")
    if backend == "triton" and device.type == "cpu" and not INTERPRETING:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (the GPU run covers it on cuda)")


def _tolerances(dtype):
    # (rtol, atol as a fraction of the reference's largest magnitude)
    return {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 1e-2),
            torch.float16: (4e-3, 2e-3)}[dtype]


def _assert_close(actual, expected, dtype, what):
    rtol, atol_frac = _tolerances(dtype)
    atol = atol_frac * max(expected.abs().max().item(), 1e-12)
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------- float64 references

def _stats_float64(nodes, labels, mode):
    """nodes (B, T, N) float64 -> sums (K, N) of token means or (K, T, N); counts (K,)."""
    per_sample = nodes.mean(dim=1) if mode == "pooled" else nodes
    sums = torch.zeros((K,) + per_sample.shape[1:], dtype=torch.float64)
    counts = torch.zeros(K, dtype=torch.int64)
    for k in range(K):
        chosen = labels == k
        counts[k] = int(chosen.sum())
        if counts[k]:
            sums[k] = per_sample[chosen].sum(dim=0)
    return sums, counts


def _linear_float64(x, weight, bias, labels, activation, mode):
    y = x.double() @ weight.double().T
    if bias is not None:
        y = y + bias.double()
    if activation == "gelu":
        y = 0.5 * y * (1.0 + torch.erf(y / math.sqrt(2.0)))
    return (y,) + _stats_float64(y, labels.cpu(), mode)


def _attention_float64(q, k, v, labels, mode):
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    out = torch.softmax(scores, dim=-1) @ v                      # (B, H, T, d_h)
    Bn, Hn, T, d_h = out.shape
    nodes = out.transpose(1, 2).reshape(Bn, T, Hn * d_h)         # node n = h * d_h + j
    return (out,) + _stats_float64(nodes, labels.cpu(), mode)


def _check_against_float64(got, ref, dtype):
    out, sums, counts = got
    ref_out, ref_sums, ref_counts = ref
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert sums.dtype == torch.float32 and sums.shape == ref_sums.shape
    assert counts.dtype == torch.int64
    torch.testing.assert_close(counts.cpu(), ref_counts)
    _assert_close(out.cpu(), ref_out, dtype, "out")
    _assert_close(sums.cpu(), ref_sums, dtype, "sums")
    absent = ref_counts == 0
    assert absent.any() and (sums.cpu()[absent] == 0).all(), "absent labels must have zero sums"


# ----------------------------------------------------------------------------- correctness

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["pooled", "token"])
@pytest.mark.parametrize("with_bias,activation", [(True, "gelu"), (False, "none"), (False, "gelu")])
def test_linear_label_stats_matches_float64(device, backend, dtype, mode, with_bias, activation):
    _skip_unrunnable(backend, device)
    T = 7
    x = torch.randn(B, T, D_IN, device=device).to(dtype)
    weight = (torch.randn(D_OUT, D_IN, device=device) / math.sqrt(D_IN)).to(dtype)
    bias = torch.randn(D_OUT, device=device).to(dtype) if with_bias else None
    labels = torch.tensor(LABELS, device=device)
    got = linear_label_stats(x, weight, bias, labels, K, activation=activation, mode=mode, backend=backend)
    _check_against_float64(got, _linear_float64(x.cpu(), weight.cpu(), None if bias is None else bias.cpu(),
                                                labels, activation, mode), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["pooled", "token"])
@pytest.mark.parametrize("T,d_head", [(13, 12), (7, 16)])
def test_attention_label_stats_matches_float64(device, backend, dtype, mode, T, d_head):
    _skip_unrunnable(backend, device)
    q, k, v = (torch.randn(B, H, T, d_head, device=device).to(dtype) for _ in range(3))
    labels = torch.tensor(LABELS, device=device)
    got = attention_label_stats(q, k, v, labels, K, mode=mode, backend=backend)
    _check_against_float64(got, _attention_float64(q.cpu(), k.cpu(), v.cpu(), labels, mode), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_inputs(device, backend):
    _skip_unrunnable(backend, device)
    dtype = torch.float16
    labels = torch.tensor(LABELS, device=device)
    x = torch.randn(B, 13, D_IN, device=device).to(dtype)
    weight = (torch.randn(D_OUT, D_IN, device=device) / math.sqrt(D_IN)).to(dtype)
    bias = torch.randn(D_OUT, device=device).to(dtype)
    got = linear_label_stats(x, weight, bias, labels, K, mode="token", backend=backend)
    _check_against_float64(got, _linear_float64(x.cpu(), weight.cpu(), bias.cpu(), labels, "gelu", "token"),
                           dtype)
    q, k, v = (torch.randn(B, H, 13, 12, device=device).to(dtype) for _ in range(3))
    got = attention_label_stats(q, k, v, labels, K, mode="pooled", backend=backend)
    _check_against_float64(got, _attention_float64(q.cpu(), k.cpu(), v.cpu(), labels, "pooled"), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["pooled", "token"])
def test_non_contiguous_inputs(device, backend, mode):
    _skip_unrunnable(backend, device)
    T = 13
    x = torch.randn(B, D_IN, T, device=device).transpose(1, 2)                    # (B, T, d_in) view
    weight = torch.randn(D_IN, 2 * D_OUT, device=device)[:, ::2].T                # (d_out, d_in) view
    bias = torch.randn(2 * D_OUT, device=device)[1::2]
    labels = torch.tensor(LABELS + [1, 2, 4], device=device)[::2]                 # (B,) strided
    assert not (x.is_contiguous() or weight.is_contiguous() or bias.is_contiguous() or labels.is_contiguous())
    got = linear_label_stats(x, weight, bias, labels, K, mode=mode, backend=backend)
    _check_against_float64(got, _linear_float64(x.cpu(), weight.cpu(), bias.cpu(), labels, "gelu", mode),
                           torch.float32)

    d_head = 12
    qkv = torch.randn(B, T, 3, H, 2 * d_head, device=device)
    q, k, v = (qkv[:, :, i, :, :d_head].transpose(1, 2) for i in range(3))        # (B, H, T, d_h) views
    assert not q.is_contiguous()
    got = attention_label_stats(q, k, v, labels, K, mode=mode, backend=backend)
    _check_against_float64(got, _attention_float64(q.cpu(), k.cpu(), v.cpu(), labels, mode), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["pooled", "token"])
def test_many_tiles(device, backend, mode):
    """Shapes spanning several tiles in every dimension (the kernels' tiles are at most 64 tokens,
    128 output columns, 32 reduction columns, 64 keys): token tiles of one sample added into the
    same sums, several reduction steps, and the online softmax rescaling across key tiles."""
    _skip_unrunnable(backend, device)
    T = 67
    labels = torch.tensor(LABELS, device=device)
    x = torch.randn(B, T, 70, device=device)
    weight = torch.randn(150, 70, device=device) / math.sqrt(70)
    bias = torch.randn(150, device=device)
    got = linear_label_stats(x, weight, bias, labels, K, mode=mode, backend=backend)
    _check_against_float64(got, _linear_float64(x.cpu(), weight.cpu(), bias.cpu(), labels, "gelu", mode),
                           torch.float32)
    q, k, v = (torch.randn(B, H, T, 16, device=device) for _ in range(3))
    q = 3.0 * q          # peaked scores: the running max changes between key tiles
    got = attention_label_stats(q, k, v, labels, K, mode=mode, backend=backend)
    _check_against_float64(got, _attention_float64(q.cpu(), k.cpu(), v.cpu(), labels, mode), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_samples_one_label_and_single_token(device, backend):
    """Edge cases: T = 1 (pooled == token), every sample in the last label."""
    _skip_unrunnable(backend, device)
    x = torch.randn(B, 1, D_IN, device=device)
    weight = torch.randn(D_OUT, D_IN, device=device)
    labels = torch.full((B,), K - 1, dtype=torch.int64, device=device)
    out, pooled, counts = linear_label_stats(x, weight, None, labels, K, mode="pooled", backend=backend)
    _, token, _ = linear_label_stats(x, weight, None, labels, K, mode="token", backend=backend)
    torch.testing.assert_close(pooled, token[:, 0])
    assert counts.tolist() == [0] * (K - 1) + [B]
    torch.testing.assert_close(pooled[K - 1], out.sum(dim=(0, 1)), rtol=1e-5, atol=1e-5)


def test_auto_backend_on_cpu_is_the_torch_twin():
    x = torch.randn(B, 7, D_IN)
    weight = torch.randn(D_OUT, D_IN)
    labels = torch.tensor(LABELS)
    auto = linear_label_stats(x, weight, None, labels, K, backend="auto")
    ref = linear_label_stats_ref(x, weight, None, labels, K, "gelu", "pooled")
    for a, r in zip(auto, ref):
        assert torch.equal(a, r)
    q, k, v = (torch.randn(B, H, 7, 12) for _ in range(3))
    auto = attention_label_stats(q, k, v, labels, K, mode="token")
    ref = attention_label_stats_ref(q, k, v, labels, K, "token")
    for a, r in zip(auto, ref):
        assert torch.equal(a, r)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_torch_on_cuda_at_cct_like_shapes(dtype):
    """On a GPU: the compiled kernels (not the interpreter) at shapes with many tiles."""
    device = torch.device("cuda")
    labels = torch.randint(0, 10, (8,), device=device)
    x = torch.randn(8, 65, 128, device=device).to(dtype)
    weight = (torch.randn(300, 128, device=device) / math.sqrt(128)).to(dtype)
    bias = torch.randn(300, device=device).to(dtype)
    for mode in ("pooled", "token"):
        got = linear_label_stats(x, weight, bias, labels, 10, mode=mode, backend="triton")
        ref = _linear_float64(x.cpu(), weight.cpu(), bias.cpu(), labels, "gelu", mode)
        _assert_close(got[0].cpu(), ref[0], dtype, "out")
        _assert_close(got[1].cpu(), ref[1], dtype, "sums")
        torch.testing.assert_close(got[2].cpu(), ref[2])
        q, k, v = (torch.randn(8, 4, 65, 64, device=device).to(dtype) for _ in range(3))
        got = attention_label_stats(q, k, v, labels, 10, mode=mode, backend="triton")
        ref = _attention_float64(q.cpu(), k.cpu(), v.cpu(), labels, mode)
        _assert_close(got[0].cpu(), ref[0], dtype, "out")
        _assert_close(got[1].cpu(), ref[1], dtype, "sums")
        torch.testing.assert_close(got[2].cpu(), ref[2])


@pytest.mark.skipif(not TRITON, reason="triton is not installed")
def test_kernels_compile_for_a_gpu_target(tmp_path):
    """Lower both kernels to a cubin for sm_90 (the H200) with Triton's real compiler and the
    bundled ptxas, no GPU needed: the interpreter above checks semantics, this checks that the
    same source compiles (relaxed atomics included). A subprocess, as compiling needs
    TRITON_INTERPRET unset. bf16 only, to stay quick; every variant:
    python -m cctk.kernels.compile_check --arch 90 --out DIR"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "cctk.kernels.compile_check", "--arch", "90", "--dtype", "bf16",
           "--kernel", "linear_label_stats", "--kernel", "attention_label_stats", "--out", str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    compiled = [line for line in result.stdout.splitlines() if "cubin" in line]
    assert len(compiled) == 2 * 3, result.stdout   # modes x (linear + attention at 2 head blocks)
    ptx = (tmp_path / "linear_label_stats_bf16_token.ptx").read_text()
    assert "atom.global" in ptx and "atom.global.acq_rel" not in ptx and ".relaxed" in ptx, \
        "the label-sum atomics must be relaxed"


# ----------------------------------------------------------------------------- bad inputs

def _linear_inputs():
    return (torch.randn(B, 7, D_IN), torch.randn(D_OUT, D_IN), torch.randn(D_OUT), torch.tensor(LABELS))


def _attention_inputs():
    return tuple(torch.randn(B, H, 7, 12) for _ in range(3)) + (torch.tensor(LABELS),)


def _bad_linear_cases():
    x, w, b, y = _linear_inputs()
    return {
        "label_too_large": ((x, w, b, torch.tensor([0, K, 1]), K), {}, ValueError),
        "label_negative": ((x, w, b, torch.tensor([0, -1, 1]), K), {}, ValueError),
        "labels_int32": ((x, w, b, y.int(), K), {}, TypeError),
        "labels_float": ((x, w, b, y.float(), K), {}, TypeError),
        "labels_2d": ((x, w, b, y[:, None], K), {}, ValueError),
        "labels_wrong_length": ((x, w, b, y[:2], K), {}, ValueError),
        "num_labels_zero": ((x, w, b, y, 0), {}, ValueError),
        "x_2d": ((x[0], w, b, y, K), {}, ValueError),
        "x_int": ((x.long(), w, b, y, K), {}, TypeError),
        "weight_wrong_d_in": ((x, w[:, :-1], b, y, K), {}, ValueError),
        "weight_1d": ((x, w[0], b, y, K), {}, ValueError),
        "bias_wrong_len": ((x, w, b[:-1], y, K), {}, ValueError),
        "weight_dtype_mismatch": ((x, w.double(), b, y, K), {}, TypeError),
        "bias_dtype_mismatch": ((x, w, b.bfloat16(), y, K), {}, TypeError),
        "weight_other_device": ((x, w.to("meta"), b, y, K), {}, ValueError),
        "labels_other_device": ((x, w, b, y.to("meta"), K), {}, ValueError),
        "unknown_mode": ((x, w, b, y, K), {"mode": "mean"}, ValueError),
        "unknown_activation": ((x, w, b, y, K), {"activation": "relu"}, ValueError),
        "unknown_backend": ((x, w, b, y, K), {"backend": "cuda"}, ValueError),
        "triton_float64": ((x.double(), w.double(), b.double(), y, K), {"backend": "triton"}, TypeError),
    }


def _bad_attention_cases():
    q, k, v, y = _attention_inputs()
    return {
        "label_too_large": ((q, k, v, torch.tensor([0, 1, K + 3]), K), {}, ValueError),
        "label_negative": ((q, k, v, torch.tensor([-2, 1, 0]), K), {}, ValueError),
        "labels_int32": ((q, k, v, y.int(), K), {}, TypeError),
        "labels_wrong_length": ((q, k, v, torch.tensor([0, 1, 2, 3]), K), {}, ValueError),
        "q_3d": ((q[0], k, v, y, K), {}, ValueError),
        "k_shape": ((q, k[:, :, :-1], v, y, K), {}, ValueError),
        "v_shape": ((q, k, v[..., :-1], y, K), {}, ValueError),
        "v_dtype_mismatch": ((q, k, v.half(), y, K), {}, TypeError),
        "q_int": ((q.int(), k.int(), v.int(), y, K), {}, TypeError),
        "k_other_device": ((q, k.to("meta"), v, y, K), {}, ValueError),
        "unknown_mode": ((q, k, v, y, K), {"mode": "pool"}, ValueError),
        "unknown_backend": ((q, k, v, y, K), {"backend": "flash"}, ValueError),
        "triton_head_dim_too_large": (tuple(torch.randn(B, 1, 3, 257) for _ in range(3)) + (y, K),
                                      {"backend": "triton"}, ValueError),
    }


def _inputs_unchanged(args):
    return [a.clone() if isinstance(a, torch.Tensor) and a.device.type != "meta" else a for a in args]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(_bad_linear_cases()))
def test_linear_label_stats_rejects_bad_input(backend, case):
    args, kwargs, error = _bad_linear_cases()[case]
    kwargs = {"backend": backend, **kwargs}
    before = _inputs_unchanged(args)
    with pytest.raises(error):
        linear_label_stats(*args, **kwargs)
    for a, b in zip(args, before):
        if isinstance(a, torch.Tensor) and a.device.type != "meta":
            assert torch.equal(a, b), "a rejected call must write nothing"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(_bad_attention_cases()))
def test_attention_label_stats_rejects_bad_input(backend, case):
    args, kwargs, error = _bad_attention_cases()[case]
    kwargs = {"backend": backend, **kwargs}
    before = _inputs_unchanged(args)
    with pytest.raises(error):
        attention_label_stats(*args, **kwargs)
    for a, b in zip(args, before):
        if isinstance(a, torch.Tensor) and a.device.type != "meta":
            assert torch.equal(a, b), "a rejected call must write nothing"


def test_label_counts_match_bincount_and_the_check_never_reads_labels_off_a_device():
    """Counts by index_add_ equal bincount's. Off the CPU the range check is enqueued on the
    device (torch._assert_async), never read back: on the meta device, which has no data to read,
    the old host-side min/max raised; the check and the counts must still go through."""
    from cctk.ops.labels import check_labels, label_counts
    labels = torch.tensor([2, 0, 2, 4, 2])
    counts = label_counts(labels, 6)
    assert counts.dtype == torch.int64 and torch.equal(counts, torch.bincount(labels, minlength=6))
    meta = torch.empty(5, dtype=torch.int64, device="meta")
    check_labels(meta, 6, batch=5, device="meta")
    assert label_counts(meta, 6).shape == (6,)


def test_label_error_message_names_the_range():
    x, w, b, _ = _linear_inputs()
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        linear_label_stats(x, w, b, torch.tensor([0, 7, 1]), K)


def test_triton_backend_on_cpu_without_interpreter_is_refused(monkeypatch):
    if not TRITON:
        pytest.skip("triton is not installed: the refusal then names the missing package (tested below)")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w, b, y = _linear_inputs()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        linear_label_stats(x, w, b, y, K, backend="triton")
    q, k, v, y = _attention_inputs()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        attention_label_stats(q, k, v, y, K, backend="triton")


def test_triton_backend_without_triton_is_refused(monkeypatch):
    import cctk.kernels
    monkeypatch.setattr(cctk.kernels, "triton_available", lambda: False)
    x, w, b, y = _linear_inputs()
    with pytest.raises(RuntimeError, match="pip install triton"):
        linear_label_stats(x, w, b, y, K, backend="triton")
    # auto falls back to the torch twin
    for got, want in zip(linear_label_stats(x, w, b, y, K, backend="auto"),
                         linear_label_stats_ref(x, w, b, y, K, "gelu", "pooled")):
        assert torch.equal(got, want)


# ----------------------------------------------------------------------------- torch.library

@pytest.mark.parametrize("op_name", ["linear_label_stats", "linear_label_stats_triton"])
@pytest.mark.parametrize("mode", ["pooled", "token"])
def test_opcheck_linear(op_name, mode):
    if op_name.endswith("_triton") and (not TRITON or not (INTERPRETING or torch.cuda.is_available())):
        pytest.skip("the Triton op needs triton, and CUDA or TRITON_INTERPRET=1")
    device = "cuda" if op_name.endswith("_triton") and not INTERPRETING else "cpu"
    x, w, b, y = (t.to(device) for t in _linear_inputs())
    op = getattr(torch.ops.cctk, op_name)
    torch.library.opcheck(op, (x, w, b, y, K, "gelu", mode))
    torch.library.opcheck(op, (x, w, None, y, K, "none", mode))


@pytest.mark.parametrize("op_name", ["attention_label_stats", "attention_label_stats_triton"])
@pytest.mark.parametrize("mode", ["pooled", "token"])
def test_opcheck_attention(op_name, mode):
    if op_name.endswith("_triton") and (not TRITON or not (INTERPRETING or torch.cuda.is_available())):
        pytest.skip("the Triton op needs triton, and CUDA or TRITON_INTERPRET=1")
    device = "cuda" if op_name.endswith("_triton") and not INTERPRETING else "cpu"
    q, k, v, y = (t.to(device) for t in _attention_inputs())
    torch.library.opcheck(getattr(torch.ops.cctk, op_name), (q, k, v, y, K, mode))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    if backend == "triton" and (not TRITON or not (INTERPRETING or torch.cuda.is_available())):
        pytest.skip("the Triton op needs triton, and CUDA or TRITON_INTERPRET=1")
    device = "cuda" if backend == "triton" and not INTERPRETING else "cpu"
    x, w, b, y = (t.to(device) for t in _linear_inputs())
    q, k, v, _ = (t.to(device) for t in _attention_inputs())

    def both(x, w, b, q, k, v, y):
        lin = linear_label_stats(x, w, b, y, K, mode="token", backend=backend)
        att = attention_label_stats(q, k, v, y, K, mode="pooled", backend=backend)
        return lin + att

    compiled = torch.compile(both, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(x, w, b, q, k, v, y), both(x, w, b, q, k, v, y)):
        torch.testing.assert_close(got, want)
