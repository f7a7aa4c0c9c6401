"""The one torch.library fragment of the ``cctk`` namespace.

Each op module (``cctk/ops/<op>.py``) declares its schema here with ``LIB.define``, registers a
fake (meta) implementation with ``torch.library.register_fake`` so the op traces under
``torch.compile``, and registers its PyTorch reference (``*_ref``) under the
``CompositeExplicitAutograd`` key: that is the fallback for every device the compiled
extension has no kernel for (or when the extension is absent). The C++/CUDA kernels in
``csrc/`` register for the ``CPU`` and ``CUDA`` keys, which take precedence.
"""
import torch

LIB = torch.library.Library("cctk", "FRAGMENT")


def define(schema: str, ref_impl):
    """Declare ``cctk::<schema>`` and register ``ref_impl`` as its portable fallback kernel."""
    name = schema.split("(", 1)[0].strip()
    LIB.define(schema)
    LIB.impl(name, ref_impl, "CompositeExplicitAutograd")
    return getattr(torch.ops.cctk, name)


def exporting() -> bool:
    """True while the model is being traced for export: ``torch.onnx.export`` (either exporter),
    ``torch.export`` (what the dynamo ONNX exporter and ``openvino.convert_model`` of an
    ExportedProgram run), or ``torch.jit.trace`` (the legacy ONNX exporter and OpenVINO's
    TorchScript path). A cctk op that a runtime does not know (``cctk::bsr_linear``, ...) then
    takes its standard-op form so the exported graph holds only ops every runtime has."""
    return bool(torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.compiler.is_exporting())
