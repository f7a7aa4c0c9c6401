"""Deploying a cctk model where a service runs it: ONNX (ONNX Runtime) and OpenVINO IR files.

    files = export_model(model, "deploy/", "onnx")                 # deploy/model.onnx
    files = export_model(model, "deploy/", "openvino", dtype="bfloat16", batch=1)
    logits = run_exported(files, "openvino", images)                # what the runtime computes

Any model cctk builds exports as it is (dense, structured = ``cctk.prune.remove_nodes``, block-
pruned): a model as built runs stock PyTorch ops (cctk's fused attention only inside
``cctk.optimize``), and an ``ANDCLinear`` traced for export multiplies by its dense weight with
the pruned blocks as zeros (the runtimes do not skip them: only ``cctk.optimize`` runs the
block-sparse kernels). ``cctk export`` is the command over these functions.
"""
from __future__ import annotations

import copy
import os
import warnings
from typing import Dict, List, Optional

import torch
from torch import nn

FORMATS = ("onnx", "openvino")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: largest |runtime - PyTorch| over the largest |logit| accepted when an export is checked:
#: fp32 the same function up to summation order; bf16 weights and activations
TOLERANCE = {"float32": 1e-4, "bfloat16": 0.05}
ONNX_OPSET = 17


def example_input(model: nn.Module, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Seeded N(0, 1) images of the model's input shape (B, C, H, W), fp32."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, int(model.in_channels), int(model.img_size), int(model.img_size), generator=g)


def count_block_sparse(model: nn.Module) -> int:
    """Number of ``ANDCLinear`` layers (exported as dense weights with zero blocks)."""
    from cctk.nn import ANDCLinear

    return sum(isinstance(m, ANDCLinear) for m in model.modules())


def runtime_module(fmt: str):
    """The runtime's Python package (``onnxruntime`` / ``openvino``), or ImportError naming the
    install command."""
    try:
        if fmt == "onnx":
            import onnx  # noqa: F401  (torch.onnx.export needs it)
            import onnxruntime
            return onnxruntime
        import openvino
        return openvino
    except ImportError as exc:
        pkg = "onnx onnxruntime" if fmt == "onnx" else "openvino"
        raise ImportError(f"--format {fmt} needs {pkg} ({exc}); pip install {pkg}") from None


def export_model(model: nn.Module, out_dir: str, fmt: str, dtype: str = "float32",
                 batch: Optional[int] = None) -> List[str]:
    """Write ``model`` (eval mode; not changed) to ``out_dir`` in ``fmt``; returns the paths
    written (``model.onnx``; ``model.xml`` + ``model.bin``). ``batch``: a fixed batch size, or
    None for a dynamic batch dimension. ``dtype`` bfloat16: the weights (and the graph) in bf16
    (OpenVINO only: ONNX Runtime's CPU provider has no bf16 kernels for these ops)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    if fmt == "onnx" and dtype != "float32":
        raise ValueError("ONNX export is float32 only: ONNX Runtime's CPU provider has no bfloat16 "
                         "kernels for this model; use --format openvino for bfloat16")
    runtime = runtime_module(fmt)
    m = copy.deepcopy(model).eval().to(DTYPES[dtype])
    x = example_input(model, batch or 2).to(DTYPES[dtype])
    os.makedirs(out_dir, exist_ok=True)
    # the exporters warn about tracing details (constant shapes of a fixed-size model, ...)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if fmt == "onnx":
            path = os.path.join(out_dir, "model.onnx")
            # the TorchScript-based exporter: a plain graph of standard ops in a second or so;
            # the dynamo exporter (dynamo=True) gives the same numbers (tests/test_export.py)
            dynamic = None if batch else {"images": {0: "batch"}, "logits": {0: "batch"}}
            torch.onnx.export(m, (x,), path, dynamo=False, opset_version=ONNX_OPSET,
                              input_names=["images"], output_names=["logits"], dynamic_axes=dynamic)
            return [path]
        om = runtime.convert_model(m, example_input=x)
        # convert_model leaves every input dimension dynamic: fix the image shape (and the batch)
        om.reshape([batch or -1, *x.shape[1:]])
        path = os.path.join(out_dir, "model.xml")
        runtime.save_model(om, path, compress_to_fp16=False)
        return [path, os.path.join(out_dir, "model.bin")]


def run_exported(files: List[str], fmt: str, x: torch.Tensor) -> torch.Tensor:
    """The logits the runtime computes for the fp32 images ``x`` from the exported files (CPU)."""
    runtime = runtime_module(fmt)
    if fmt == "onnx":
        sess = runtime.InferenceSession(files[0], providers=["CPUExecutionProvider"])
        return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0].copy())
    core = runtime.Core()
    om = core.read_model(files[0])
    if om.inputs[0].get_element_type() == runtime.Type.bf16:
        # bf16 input: give the runtime fp32 images converted on entry by its own preprocessing
        from openvino.preprocess import PrePostProcessor

        ppp = PrePostProcessor(om)
        ppp.input().tensor().set_element_type(runtime.Type.f32)
        ppp.output().tensor().set_element_type(runtime.Type.f32)
        om = ppp.build()
    compiled = core.compile_model(om, "CPU")
    return torch.from_numpy(compiled({0: x.numpy()})[0].copy()).float()


def check_exported(model: nn.Module, files: List[str], fmt: str, dtype: str = "float32",
                   batch: Optional[int] = None) -> Dict[str, float]:
    """Run the exported files once on seeded images (a batch other than the example's when the
    batch is dynamic) and compare with the fp32 PyTorch model's logits; returns
    ``{"max_abs_diff", "logit_scale", "tolerance"}``; a difference beyond the dtype's
    :data:`TOLERANCE` (relative to the logit scale) raises RuntimeError."""
    x = example_input(model, batch or 3, seed=1)
    with torch.no_grad():
        ref = model.eval()(x).float()
    out = run_exported(files, fmt, x)
    if out.shape != ref.shape:
        raise RuntimeError(f"the exported model returned shape {tuple(out.shape)}, PyTorch {tuple(ref.shape)}")
    err = (out - ref).abs().max().item()
    scale = ref.abs().max().item()
    tol = TOLERANCE[dtype] * max(scale, 1e-6)
    if not err <= tol:
        raise RuntimeError(f"the exported model's logits differ from PyTorch's by {err:.3g} (logit scale "
                           f"{scale:.3g}, tolerance {tol:.3g}); the export is wrong, please report it")
    return {"max_abs_diff": err, "logit_scale": scale, "tolerance": tol}
