"""cctk.checkpoint, the bottom layer: safe reads only (crafted files never run), mkstemp + rename
writes that no pre-placed symlink can redirect, pairs replaced together, one run per directory
(lock), stale temporary files cleared, and one rebuild for dense and pruned models."""
import json
import os

import numpy as np
import pytest
import torch

import cctk.prune as P
from cctk import checkpoint as C
from cctk.models import create_model
from cctk.train.state import checkpoint_dict

K = 10


def tiny():
    return create_model("cct_2_3x1_8", num_classes=K)


def dense_ckpt(path, model=None):
    model = model or tiny()
    C.atomic_save(checkpoint_dict(model=model, dataset={"name": "digits"}, train_config={}, epoch=1),
                  path)
    return model


class _Payload:
    """Unpickling this runs ``os.mkdir(marker)``: the proof that a loader executed the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def crafted(path, marker):
    torch.save({"format": C.CHECKPOINT_FORMAT, "state_dict": {}, "payload": _Payload(marker)}, path)


# ---------------------------------------------------------------------------------------------
# security


@pytest.mark.parametrize("force_unsafe_env", [False, True], ids=["default", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"])
def test_crafted_checkpoint_never_runs(tmp_path, monkeypatch, force_unsafe_env):
    if force_unsafe_env:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    crafted(tmp_path / "evil.pt", marker)
    with pytest.raises(C.CheckpointError, match="cannot read checkpoint"):
        C.load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_no_unsafe_retry_after_a_type_error(tmp_path, monkeypatch):
    """A file that makes the safe loader raise TypeError is refused, not reloaded unsafely."""
    dense_ckpt(tmp_path / "c.pt")
    calls = []

    def fake_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        raise TypeError("crafted")

    monkeypatch.setattr(torch, "load", fake_load)
    with pytest.raises(C.CheckpointError):
        C.read_checkpoint(tmp_path / "c.pt")
    assert calls == [True]


def test_atomic_write_does_not_follow_a_planted_symlink(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    for name in ("prune.json", "snp.json.tmp", "snp.json"):
        (out / name).symlink_to(victim)
    C.atomic_write_text("result", out / "prune.json")
    C.atomic_write_files({out / "snp.json": ("w", lambda f: f.write("{}"))})
    assert victim.read_text() == "precious"
    assert not (out / "prune.json").is_symlink() and (out / "prune.json").read_text() == "result"
    assert not (out / "snp.json").is_symlink()


# ---------------------------------------------------------------------------------------------
# data lost


def test_pair_is_replaced_together_or_not_at_all(tmp_path):
    a, b = tmp_path / "snp.json", tmp_path / "nodes.npz"
    C.atomic_write_files({a: ("w", lambda f: f.write("old a")), b: ("w", lambda f: f.write("old b"))})

    def fail(f):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        C.atomic_write_files({a: ("w", lambda f: f.write("new a")), b: ("w", fail)})
    assert a.read_text() == "old a" and b.read_text() == "old b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nodes.npz", "snp.json"]  # no temp files


def test_output_dir_lock_and_stale_temp_cleanup(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".tmp-checkpoint.pt-abc123").write_bytes(b"half a checkpoint")
    with C.output_dir(out):
        assert not (out / ".tmp-checkpoint.pt-abc123").exists()
        with pytest.raises(C.CheckpointError, match="in use by another cctk process"):
            with C.output_dir(out):
                pass
    with C.output_dir(out):  # released at the end of the block
        pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(C.CheckpointError, match="is a file"):
        with C.output_dir(tmp_path / "file"):
            pass


def test_metrics_log_never_runs_ahead_of_the_checkpoint(tmp_path):
    from cctk.train import TrainConfig, train

    class Kill(Exception):
        pass

    def kill_after_first(epoch, record):
        if epoch == 0:
            raise Kill

    cfg = TrainConfig(dataset="digits", epochs=2, save_every=2, warmup_epochs=0, batch_size=32,
                      train_subset=64, test_subset=32, out=str(tmp_path / "r"), verbose=False,
                      progress=False, device="cpu")
    with pytest.raises(Kill):
        train(cfg, on_epoch_end=kill_after_first)
    assert not (tmp_path / "r" / "checkpoint.pt").exists()
    # epoch 1 had no checkpoint: no log of it either, nothing at all (the run created the directory)
    assert not (tmp_path / "r").exists()
    m = train(cfg)   # a directory without a checkpoint holds no run: no --overwrite needed
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["epoch"] for s in lines] == [1, 2] and m["epochs"] == 2


# ---------------------------------------------------------------------------------------------
# reading and rebuilding


def test_one_rebuild_for_dense_and_pruned(tmp_path):
    m = dense_ckpt(tmp_path / "dense.pt")
    loaded, ckpt = C.load_checkpoint(tmp_path / "dense.pt")
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m.eval()(x), atol=0, rtol=0)
    pm, plan = P.prune_andc(m, P.RecognizedSets.from_snp(_sets(m)), block_size=16, density=0.5)
    P.convert_to_andc(pm)
    P.save_pruned(pm, plan, tmp_path / "pruned.pt", source_checkpoint=ckpt)
    pl, pck = C.load_checkpoint(tmp_path / "pruned.pt")
    assert C.is_pruned_checkpoint(pck) and not C.is_pruned_checkpoint(ckpt)
    with torch.no_grad():
        torch.testing.assert_close(pl(x), pm.eval()(x), atol=0, rtol=0)


def _sets(m, seed=1):
    """Random recognised-label sets of the right shapes (for a pruning plan, not for meaning)."""
    g = torch.Generator().manual_seed(seed)
    rows = {"final": m.embed_dim, "tokens": m.embed_dim}
    for b in range(m.num_blocks):
        rows.update({f"b{b}_mha": m.embed_dim, f"b{b}_ff": m.ff_dim, f"b{b}_stream_mha": m.embed_dim,
                     f"b{b}_stream_ff": m.embed_dim, f"b{b}_heads": m.num_heads})
    return {f"{k}_recognized": torch.rand(n, K, generator=g) < 0.4 for k, n in rows.items()}


@pytest.mark.parametrize("damage, message", [
    (lambda c: c.pop("state_dict"), "holds no model weights"),
    (lambda c: c.update(state_dict={}), "holds no model weights"),
    (lambda c: c.pop("model_config"), "names no model"),
    (lambda c: c["state_dict"].update({k: torch.zeros(3) for k in list(c["state_dict"])[:1]}),
     "do not fit its model"),
    (lambda c: c["state_dict"].pop(next(iter(c["state_dict"]))), "do not fit its model"),
    (lambda c: c["model_config"].update(colour="red"), "cannot build model"),
])
def test_damaged_checkpoints_are_clear_errors(tmp_path, damage, message):
    m = tiny()
    ckpt = checkpoint_dict(model=m, dataset={"name": "digits"}, train_config={}, epoch=1)
    damage(ckpt)
    torch.save(ckpt, tmp_path / "c.pt")
    with pytest.raises(C.CheckpointError, match=message):
        C.load_checkpoint(tmp_path / "c.pt")


def test_empty_and_foreign_files(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    np.save(tmp_path / "arr.npy", np.zeros(3))
    for name in ("empty.pt", "arr.npy"):
        with pytest.raises(C.CheckpointError, match="cannot read checkpoint"):
            C.read_checkpoint(tmp_path / name)
