"""The runtimes a whole-model bench sets side by side (shared by bench_models.py and
bench_study_peers.py): each ``*_runner`` returns a callable taking the fp32 image batch (and,
for the optional peers, a reason it skipped or None); :func:`checked_runs` checks every runner's
logits before anything is timed."""
from __future__ import annotations

import copy
import os
import tempfile
import warnings

import torch

import cctk


def torch_runner(model, dtype, compile_=False):
    """Stock PyTorch: a cctk model as built runs torch's own ops (SDPA attention; cctk's fused
    kernels only inside ``cctk.optimize``), so a copy cast to ``dtype`` is the stock runtime."""
    m = copy.deepcopy(model).to(dtype)
    if compile_:
        m = torch.compile(m, dynamic=False)

    def run(x):
        with torch.no_grad():
            return m(x.to(dtype)).float()
    return run


def cctk_runner(model, dtype, x, compile_=False):
    m = cctk.optimize(model, dtype=dtype, compile=compile_, sample_input=x)  # tuned at the bench's batch

    def run(x):
        with torch.no_grad():
            return m(x).float()
    return run


def openvino_runner(model, dtype, x):
    try:
        import openvino as ov
    except ImportError:
        return None, "openvino not installed (pip install cctk[bench])"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        om = ov.convert_model(model, example_input=x)
    hint = "bf16" if dtype == torch.bfloat16 else "f32"
    compiled = ov.Core().compile_model(om, "CPU", {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY",
                                                   "INFERENCE_NUM_THREADS": torch.get_num_threads()})
    req = compiled.create_infer_request()

    def run(xb):
        return torch.from_numpy(req.infer({0: xb.numpy()})[0].copy())
    return run, None


def openvino_int8_runner(model, x, calibration_batches: int = 8):
    """OpenVINO int8: NNCF post-training quantization of the fp32 OpenVINO model (what an OpenVINO
    user does after fp32/bf16), calibrated on ``calibration_batches`` seeded random batches shaped
    like ``x`` (a speed peer: its accuracy on real data is not measured here)."""
    try:
        import nncf
        import openvino as ov
    except ImportError:
        return None, "openvino/nncf not installed (pip install cctk[bench] nncf)"
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(x.shape, generator=g).numpy() for _ in range(calibration_batches)]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        om = ov.convert_model(model, example_input=x)
        qm = nncf.quantize(om, nncf.Dataset(calib), subset_size=calibration_batches)
    compiled = ov.Core().compile_model(qm, "CPU", {"PERFORMANCE_HINT": "LATENCY",
                                                   "INFERENCE_NUM_THREADS": torch.get_num_threads()})
    req = compiled.create_infer_request()

    def run(xb):
        return torch.from_numpy(req.infer({0: xb.numpy()})[0].copy())
    return run, None


def onnxruntime_runner(model, dtype, x):
    if dtype != torch.float32:
        return None, "ONNX Runtime's CPU provider has no bf16 kernels for this model (fp32 only)"
    try:
        import onnxruntime as ort
    except ImportError:
        return None, "onnxruntime not installed (pip install cctk[bench])"
    path = os.path.join(tempfile.mkdtemp(prefix="cctk-bench-"), "model.onnx")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["logits"])
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

    def run(xb):
        return torch.from_numpy(sess.run(None, {"x": xb.numpy()})[0])
    return run, None


def checked_runs(built: dict, x, dtype):
    """``built``: {provider: (model, run, why skipped or None)}, ``provider[0]`` naming the model
    it runs. Every run's logits (its first call: also the warm-up and any compilation) are
    checked against the fp32 output of its model in stock PyTorch (fp32: within 1e-3 of the
    logit scale; bf16: 5%; an int8 provider, ``provider[1]`` ending in "int8": 25%, a check that
    it runs the same model, not of its accuracy). Returns ({provider: run}, {provider: why skipped})."""
    runs, skipped, refs = {}, {}, {}
    for p, (model, run, why) in built.items():
        if why:
            skipped[p] = why
            continue
        if p[0] not in refs:
            with torch.no_grad():
                refs[p[0]] = model(x).float()
        ref, out = refs[p[0]], run(x)
        err = (out - ref).abs().max().item()
        rel = 0.25 if str(p[1]).endswith("int8") else (1e-3 if dtype == torch.float32 else 0.05)
        tol = rel * max(1.0, ref.abs().max().item())
        assert err <= tol, f"{p}: logits differ from the fp32 reference by {err:.3g} (> {tol:.3g})"
        runs[p] = run
    return runs, skipped
