"""Deployment: every model cctk builds (dense, structured, block-pruned) exports through
``torch.onnx.export`` (both exporters) and ``openvino.convert_model``, in eval mode with and
without ``torch.no_grad()``, and ONNX Runtime / OpenVINO compute PyTorch's logits (fp32, within
1e-4 of the logit scale); ``cctk export`` writes a file the runtime loads from any digits
checkpoint; a ``cctk.optimize`` result pickles."""
import contextlib
import io
import json
import pickle
import warnings

import numpy as np
import pytest
import torch

import cctk
from cctk import cli
from cctk.checkpoint import replace_submodule
from cctk.models import create_model
from cctk.nn import ANDCLinear, MaskedLinear
from cctk.prune.structured import remove_nodes

ort = pytest.importorskip("onnxruntime")
ov = pytest.importorskip("openvino")
pytest.importorskip("onnxscript")  # the dynamo exporter's translator

MODEL = "cct_2_3x1_8"


def _block_pruned(seed=1):
    torch.manual_seed(seed)
    m = create_model(MODEL)
    g = torch.Generator().manual_seed(seed)
    for name, lin in list(m.named_modules()):
        if isinstance(lin, torch.nn.Linear) and name.startswith("classifier.blocks"):
            mask = torch.rand((lin.out_features + 15) // 16, (lin.in_features + 15) // 16, generator=g) < 0.5
            replace_submodule(m, name, ANDCLinear.from_dense(lin, mask, 16))
    fc = m.get_submodule("classifier.fc")
    replace_submodule(m, "classifier.fc", MaskedLinear.from_linear(fc, torch.rand(fc.weight.shape, generator=g) < 0.3))
    return m.eval()


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    dense = create_model(MODEL).eval()
    structured = remove_nodes(dense, ff_keep={0: torch.arange(0, 128, 2), 1: torch.arange(40)},
                              head_dims_keep={0: torch.stack([torch.arange(48)] * 2),
                                              1: torch.stack([torch.arange(0, 64, 2)] * 2)}).eval()
    return {"dense": dense, "structured": structured, "block-pruned": _block_pruned()}


X = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))


def _mode(no_grad):
    return torch.no_grad() if no_grad else contextlib.nullcontext()


def _assert_same_logits(out, model):
    with torch.no_grad():
        ref = model(X)
    out = torch.as_tensor(np.asarray(out))
    assert out.shape == ref.shape
    err = (out - ref).abs().max().item()
    assert err <= 1e-4 * ref.abs().max().item(), err


def _onnx(model, path, no_grad, dynamo):
    with _mode(no_grad), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (X,), str(path), dynamo=dynamo, input_names=["x"], output_names=["logits"])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: X.numpy()})[0]


KINDS = ("dense", "structured", "block-pruned")


@pytest.mark.parametrize("no_grad", [True, False], ids=["no_grad", "grad"])
@pytest.mark.parametrize("kind", KINDS)
def test_legacy_onnx_export(models, tmp_path, kind, no_grad):
    _assert_same_logits(_onnx(models[kind], tmp_path / "m.onnx", no_grad, dynamo=False), models[kind])


# the dynamo exporter and OpenVINO take seconds per model: both grad modes across the kinds
# (the legacy exporter above covers every pair; a structured model holds the dense model's ops
# with narrower linears, and OpenVINO below and cctk export run it)
@pytest.mark.parametrize("kind, no_grad", [("dense", True), ("block-pruned", False)])
def test_dynamo_onnx_export(models, tmp_path, kind, no_grad):
    _assert_same_logits(_onnx(models[kind], tmp_path / "m.onnx", no_grad, dynamo=True), models[kind])


# (the dense model's conversion runs in test_cctk_export, under no_grad)
@pytest.mark.parametrize("kind, no_grad", [("structured", True), ("block-pruned", False)])
def test_openvino_convert(models, kind, no_grad):
    with _mode(no_grad), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        om = ov.convert_model(models[kind], example_input=X)
    compiled = ov.Core().compile_model(om, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    _assert_same_logits(compiled({0: X.numpy()})[0], models[kind])


def test_fused_attention_only_inside_optimize(models, monkeypatch):
    """A model as built is stock PyTorch in every mode (no cctk::attention); cctk.optimize
    switches the fused kernel on, and an optimized model still decomposes it when traced."""
    import cctk.models.cct as cct

    calls = []
    real = cct.cctk_attention
    monkeypatch.setattr(cct, "cctk_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    dense = models["dense"]
    with torch.no_grad():
        ref = dense(X)
    assert calls == []
    fast = cctk.optimize(dense, dtype=torch.float32, tune=False)  # untuned: the fused kernel everywhere
    assert all(a.fused_attention for a in (b.self_attn for b in fast.blocks))
    assert not any(a.fused_attention for a in (b.self_attn for b in dense.blocks))
    with torch.no_grad():
        out = fast(X)
    assert len(calls) == len(dense.blocks)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    calls.clear()
    with torch.no_grad():
        torch.jit.trace(fast, (X,), check_trace=False)
    assert calls == []


@pytest.mark.parametrize("kind, dtype, tune", [("dense", torch.float32, False), ("block-pruned", torch.bfloat16, True)],
                         ids=["dense-fp32", "block-pruned-bf16-tuned"])
def test_optimized_model_pickles(models, kind, dtype, tune):
    fast = cctk.optimize(models[kind], dtype=dtype, tune=tune)
    with torch.no_grad():
        ref = fast(X)
    again = pickle.loads(pickle.dumps(fast))
    buf = io.BytesIO()
    torch.save(fast, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for m in (again, loaded):
        with torch.no_grad():
            assert torch.equal(m(X), ref)
        packed = [sub._packed is not None for sub in m.modules() if isinstance(sub, ANDCLinear)]
        assert all(packed) == all(sub._packed is not None for sub in fast.modules() if isinstance(sub, ANDCLinear))


# ---------------------------------------------------------------------------------------------
# cctk export on digits checkpoints of every kind


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_runs")
    fast = ["--device", "cpu"]
    assert cli.main(["train", "--dataset", "digits", "--epochs", "1", "--train-subset", "256", "--test-subset",
                     "64", "--out", str(root / "train"), "--no-verbose", "--no-progress"] + fast) == 0
    dense = root / "train" / "checkpoint.pt"
    for method in ("magnitude", "structured-activation"):
        assert cli.main(["prune", "--checkpoint", str(dense), "--method", method, "--density", "0.5",
                         "--block-size", "16", "--finetune-epochs", "0", "--subset", "64",
                         "--out", str(root / method)] + fast) == 0
    return {"dense": dense, "block-pruned": root / "magnitude" / "checkpoint.pt",
            "structured": root / "structured-activation" / "checkpoint.pt"}


def _runtime_logits(out_dir, fmt, x):
    if fmt == "onnx":
        sess = ort.InferenceSession(str(out_dir / "model.onnx"), providers=["CPUExecutionProvider"])
        return sess.run(None, {"images": x.numpy()})[0]
    om = ov.Core().read_model(str(out_dir / "model.xml"))
    if om.inputs[0].get_element_type() == ov.Type.bf16:  # fp32 in and out through OpenVINO's preprocessing
        from cctk.deploy import run_exported

        return run_exported([str(out_dir / "model.xml")], "openvino", x)
    compiled = ov.Core().compile_model(om, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled({0: x.numpy()})[0]


@pytest.mark.parametrize("kind, fmt, extra, tol", [
    ("dense", "onnx", [], 1e-4),
    ("dense", "openvino", ["--dtype", "bfloat16", "--batch", "5"], 0.05),
    ("structured", "onnx", [], 1e-4),
    ("block-pruned", "onnx", ["--batch", "dynamic"], 1e-4),
])
def test_cctk_export(checkpoints, tmp_path, capsys, kind, fmt, extra, tol):
    from cctk import data
    from cctk.checkpoint import file_digest, load_checkpoint

    out = tmp_path / "deploy"
    capsys.readouterr()
    assert cli.main(["export", "--checkpoint", str(checkpoints[kind]), "--format", fmt, "--out", str(out)]
                    + extra) == 0
    printed = capsys.readouterr().out
    assert f"checked: {fmt} logits equal PyTorch's" in printed
    assert ("will not skip them" in printed) == (kind == "block-pruned")
    record = json.loads((out / "export.json").read_text())
    assert record["checkpoint_sha256"] == file_digest(checkpoints[kind])
    assert record["check"]["max_abs_diff"] <= record["check"]["tolerance"]
    assert sorted(p.name for p in out.iterdir()) == sorted(record["files"] + ["export.json"])
    if fmt == "openvino":
        om = ov.Core().read_model(str(out / "model.xml"))
        assert om.inputs[0].get_element_type() == (ov.Type.bf16 if "bfloat16" in extra else ov.Type.f32)
        assert str(om.inputs[0].get_partial_shape()) == ("[5,1,8,8]" if "5" in extra else "[?,1,8,8]")
    # the file the runtime loads computes the checkpoint's logits (a batch of 5 real images)
    model, ckpt = load_checkpoint(checkpoints[kind])
    ds = data.from_record(ckpt["dataset"], "eval", subset=5)
    x = torch.stack([ds[i][0] for i in range(5)])
    with torch.no_grad():
        ref = model(x)
    err = (torch.as_tensor(np.asarray(_runtime_logits(out, fmt, x))) - ref).abs().max().item()
    assert err <= tol * ref.abs().max().item(), err
