"""Shared test set-up.

* Without a CUDA device, Triton kernels run under the interpreter (``TRITON_INTERPRET=1``) on
  CPU tensors: set here, before any Triton kernel module is imported.
* ``cctk.tune``'s cache of measured choices lives in a temporary directory of the session.
* ``devices`` lists the devices present at run time; CUDA-only tests carry ``@pytest.mark.cuda``
  and skip cleanly without a GPU.
"""
import os
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# cctk.optimize's measured choices (cctk.tune) go to a cache of this test session, not ~/.cache
os.environ.setdefault("CCTK_CACHE_DIR", tempfile.mkdtemp(prefix="cctk-test-cache-"))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
