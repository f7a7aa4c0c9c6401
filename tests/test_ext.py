"""The compiled extension: the label_sum op (C++ kernel vs its reference), the build facts,
and the fallback when the extension is missing (a warning and working reference paths, never a
crash at import), and that importing cctk never initialises CUDA."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from cctk import _ext
from cctk.ops import label_sum, label_sum_ref

needs_ext = pytest.mark.skipif(not _ext.available(), reason="cctk._C not built (CCTK_NO_EXT install)")


@needs_ext
def test_extension_matches_installed_torch():
    info = _ext.info()
    assert info["extension"] and info["error"] is None
    assert info["built_for_torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["cpu_capability"] in ("scalar", "avx2", "avx512", "avx512_bf16")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("B,N,K", [(1, 1, 1), (7, 37, 5), (97, 300, 10)])
def test_label_sum_ext_matches_reference(dtype, B, N, K):
    x = torch.randn(B, N, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, K, (B,))
    sums, counts = label_sum(x, labels, K, backend="ext")
    ref_sums, ref_counts = label_sum_ref(x, labels, K)
    assert sums.dtype == torch.float32 and counts.dtype == torch.int64
    torch.testing.assert_close(sums, ref_sums, rtol=1e-5, atol=1e-5)
    assert torch.equal(counts, ref_counts)


@needs_ext
def test_label_sum_noncontiguous_and_opcheck():
    x = torch.randn(40, 12).t()  # (12, 40) non-contiguous
    labels = torch.arange(12) % 3
    sums, counts = label_sum(x, labels, 3, backend="ext")
    torch.testing.assert_close(sums, label_sum_ref(x.contiguous(), labels, 3)[0])
    torch.library.opcheck(torch.ops.cctk.label_sum.default, (x.contiguous(), labels, 3))


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_label_sum_refuses_bad_input(backend):
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        label_sum(x, torch.tensor([0, 1, 3, 0]), 3, backend=backend)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        label_sum(x, torch.tensor([0, 1, -1, 0]), 3, backend=backend)
    with pytest.raises(TypeError, match="int64"):
        label_sum(x, torch.tensor([0, 1, 2, 0], dtype=torch.int32), 3, backend=backend)
    with pytest.raises(ValueError, match="4 samples"):
        label_sum(x, torch.tensor([0, 1, 2]), 3, backend=backend)
    with pytest.raises(TypeError, match="floating point"):
        label_sum(torch.ones(4, 3, dtype=torch.int64), torch.tensor([0, 1, 2, 0]), 3, backend=backend)
    with pytest.raises(ValueError, match="backend"):
        label_sum(x, torch.tensor([0, 1, 2, 0]), 3, backend="cuda-magic")


def _run(code, env=None):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, timeout=300)


def test_import_does_not_initialise_cuda():
    r = _run("""
        import torch, cctk, cctk.models, cctk.snp, cctk.prune, cctk.train, cctk.data
        assert not torch.cuda.is_initialized(), "importing cctk initialised CUDA"
        print("ok")
    """)
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout


def test_missing_extension_warns_and_falls_back():
    # Make `import cctk._C` fail as it would without a build (or with one for another torch):
    # cctk must import with one RuntimeWarning, report the extension unavailable, refuse
    # backend="ext" with an actionable message, and run every op on its reference path.
    r = _run("""
        import sys, warnings
        sys.modules["cctk._C"] = None          # import of the extension now raises ImportError
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, cctk
        from cctk import _ext
        assert not _ext.available() and not _ext.supports("cpu")
        msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        built = __import__("cctk._build_info", fromlist=["WITH_EXT"]).WITH_EXT
        assert (len([m for m in msgs if "compiled extension unavailable" in m]) == 1) == bool(built), msgs
        x = torch.randn(9, 5); labels = torch.randint(0, 3, (9,))
        s, c = cctk.ops.label_sum(x, labels, 3)
        r, rc = cctk.ops.label_sum_ref(x, labels, 3)
        assert torch.allclose(s, r) and torch.equal(c, rc)
        try:
            cctk.ops.label_sum(x, labels, 3, backend="ext")
        except RuntimeError as e:
            assert "reinstall" in str(e)
        else:
            raise AssertionError("backend='ext' without the extension must raise")
        lin = torch.nn.Linear(40, 24)
        mask = torch.tensor([[True, False, True], [False, True, True]])
        m = cctk.ANDCLinear.from_dense(lin, mask, block_size=16)
        xin = torch.randn(3, 5, 40, requires_grad=True)
        full = torch.kron(mask.float(), torch.ones(16, 16))[:24, :40]
        ref = torch.nn.functional.linear(xin, lin.weight * full, lin.bias)
        out = m(xin)
        assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
        out.sum().backward()
        print("fallback ok")
    """)
    assert r.returncode == 0, r.stderr
    assert "fallback ok" in r.stdout
