"""One CPU training step (forward, loss, backward, AdamW step) of a CCT with the tokenizer's conv
weights channels-last, as ``model.train()`` leaves them on the CPU, against the same model with
its conv weights in the default (NCHW) layout: the layout cctk trained with before.

    pytest bench/bench_train_step.py --benchmark-only
    OMP_NUM_THREADS=1 pytest bench/bench_train_step.py --benchmark-only     # as `cctk study` fine-tunes

Models: ``cct_2_3x2_28`` on 28x28 grey images (the Fashion-MNIST study's, batch 128) and
``cct_7_3x1_32`` on 32x32 colour (batch 32). Both variants start from the same weights and run
interleaved round by round in a fresh order (``cctk.timing``), fastest round compared;
``extra_info["speedup_vs_dense"]`` is NCHW's fastest step over channels-last's (the "dense" of
the summary table's key is the old layout here). The two losses of the first step are checked
equal (same weights, same dropout draws).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from cctk.models import create_model
from cctk.timing import interleaved_times

CASES = {"cct_2_3x2_28": (1, 28, 10, 128), "cct_7_3x1_32": (3, 32, 100, 32)}


def _nchw_training_copy(model):
    """The model in training mode with its conv weights left NCHW (training flags set directly,
    so Tokenizer.train does not change the layout)."""
    m = copy.deepcopy(model)
    for mod in m.modules():
        mod.training = True
    for p in m.parameters():
        if p.dim() == 4:
            p.data = torch.empty(p.shape, dtype=p.dtype).copy_(p.data)   # plain NCHW strides
    return m


@pytest.mark.parametrize("name", list(CASES))
def test_cpu_training_step_channels_last(benchmark, name):
    chans, size, classes, batch = CASES[name]
    torch.manual_seed(0)
    base = create_model(name, num_classes=classes, img_size=size, in_channels=chans)
    old = _nchw_training_copy(base)
    new = copy.deepcopy(base).train()
    assert new.tokenizer.conv_layers[0][0].weight.stride() != old.tokenizer.conv_layers[0][0].weight.stride()
    x, y = torch.randn(batch, chans, size, size), torch.randint(0, classes, (batch,))
    opts = {m: torch.optim.AdamW(m.parameters(), lr=1e-5) for m in (old, new)}

    def step(m):
        def run():
            loss = F.cross_entropy(m(x), y)
            opts[m].zero_grad(set_to_none=True)
            loss.backward()
            opts[m].step()
            return loss.item()
        return run

    torch.manual_seed(1)
    l_old = step(old)()
    torch.manual_seed(1)
    l_new = step(new)()
    assert l_new == pytest.approx(l_old, rel=1e-4)
    t = interleaved_times({"nchw": step(old), "channels_last": step(new)}, rounds=15)
    speedup = min(t["nchw"]) / min(t["channels_last"])
    benchmark.group = f"train-step-cpu-{name}"
    benchmark.extra_info.update(speedup_vs_dense=speedup, nchw_min_s=min(t["nchw"]),
                                channels_last_min_s=min(t["channels_last"]), batch=batch,
                                threads=torch.get_num_threads(), rounds=15)
    benchmark.pedantic(step(new), rounds=3, iterations=1, warmup_rounds=0)
    print(f"\n{name} training step, channels-last conv weights vs NCHW: {speedup:.2f}x")
