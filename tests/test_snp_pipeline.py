"""End to end: a tiny CCT trained on digits -> `cctk snp` -> snp.json / nodes.npz / plots with
the documented schema; the statistics of 2 DDP (gloo) processes equal those of one."""
import json
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

from cctk.models import create_model
from cctk.snp import collect_label_stats, load_recognized, load_snp, run_snp, save

GROUPS = ("mha", "ff", "stream_mha", "stream_ff")
SUBBLOCK_KEYS = ("readout_accuracy", "mean_recognized", "mean_clusters", "mean_cluster_size",
                 "mean_noise", "snr", "frac_no_cluster", "num_nodes")
HEAD_KEYS = ("share_mean", "null_z", "p_value", "jaccard_mean", "unique_labels", "heads")


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory):
    from cctk.train import TrainConfig, train
    out = tmp_path_factory.mktemp("digits_run")
    train(TrainConfig(dataset="digits", model="cct_2_3x1_8", epochs=4, batch_size=32,
                      warmup_epochs=0.5, train_subset=480, test_subset=120, out=str(out),
                      seed=0, progress=False, cpu_threads=2))
    return str(out / "checkpoint.pt")


def test_cli_writes_the_schema(digits_checkpoint, tmp_path, capsys):
    from cctk.cli import main
    out = tmp_path / "snp"
    code = main(["snp", "--checkpoint", digits_checkpoint, "--out", str(out),
                 "--readout-epochs", "5", "--null-draws", "200", "--backend", "torch",
                 "--subset", "240"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "block" in printed and "heads" in printed
    for name in ("snp.json", "nodes.npz", "node_matrices.png", "blocks.png", "heads_block0.png",
                 "heads_block1.png"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "snp.json").read_text())
    cfg = summary["config"]
    assert cfg["threshold"] == 0.3 and cfg["readout_mode"] == "pooled"
    assert cfg["dataset"] == "digits" and cfg["model"] == "cct_2_3x1_8" and cfg["split"] == "test"
    K, L, H = cfg["num_classes"], cfg["num_blocks"], cfg["num_heads"]
    assert (K, L, H) == (10, 2, 2)
    assert len(summary["blocks"]) == L and len(summary["heads"]) == L and len(summary["stream"]) == L
    assert summary["model_accuracy"] > 0.3                 # learned something (chance: 0.1)
    arrays = dict(np.load(out / "nodes.npz"))
    for b, block in enumerate(summary["blocks"]):
        for g in GROUPS:
            entry = block[g]
            for key in SUBBLOCK_KEYS:
                assert key in entry, (b, g, key)
            assert 0.0 <= entry["readout_accuracy"] <= 1.0
            rec = arrays[f"b{b}_{g}_recognized"]
            cid = arrays[f"b{b}_{g}_cluster_id"]
            ncl = arrays[f"b{b}_{g}_num_clusters"]
            assert rec.dtype == bool and rec.shape == (entry["num_nodes"], K)
            assert cid.dtype in (np.int8, np.int16) and cid.shape == rec.shape
            assert np.array_equal(cid >= 0, rec)             # the clusters' union is D_n
            assert np.array_equal(cid.max(1, initial=-1) + 1, ncl)
            assert arrays[f"b{b}_{g}_noise"].min() >= 0
            assert entry["mean_recognized"] == pytest.approx(rec.sum(1).mean())
        head = summary["heads"][b]
        for key in HEAD_KEYS:
            assert key in head
        assert len(head["heads"]) == H and head["null_draws"] == 200
        assert head["p_value"] is None or 1 / 201 <= head["p_value"] <= 1
        assert arrays[f"b{b}_coverage"].shape == (H, K)
        assert np.array_equal(arrays[f"b{b}_coverage"],
                              arrays[f"b{b}_mha_recognized"].reshape(H, -1, K).sum(1))
        assert arrays[f"b{b}_heads_recognized"].shape == (H, K)
        for h, entry in enumerate(head["heads"]):
            assert np.flatnonzero(arrays[f"b{b}_heads_recognized"][h]).tolist() == entry["recognized"]
        assert summary["stream"][b]["mha"] == block["stream_mha"]["readout_accuracy"]
    # the stream entering block 0 is measured like every other place (SCIENCE.md 5)
    tokens = summary["tokens"]
    for key in SUBBLOCK_KEYS:
        assert key in tokens, key
    assert 0.0 <= tokens["readout_accuracy"] <= 1.0 and tokens["num_nodes"] == 128
    assert arrays["tokens_recognized"].dtype == bool and arrays["tokens_recognized"].shape == (128, K)
    assert tokens["mean_recognized"] == pytest.approx(arrays["tokens_recognized"].sum(1).mean())
    assert np.array_equal(arrays["tokens_cluster_id"] >= 0, arrays["tokens_recognized"])
    assert "tokens (stream entering block 0)" in printed
    assert arrays["final_recognized"].shape == (128, K)
    assert summary["final"]["fc_kept_fraction"] == pytest.approx(arrays["final_recognized"].mean())
    recognized = load_recognized(str(out))
    assert set(recognized) == {k for k in arrays if k.endswith("_recognized")}
    assert all(v.dtype == bool for v in recognized.values())
    again = load_snp(str(out))
    assert again.summary == summary


def _digits_tensors(n=None):
    from cctk import data
    ds = data.get_dataset("digits", "test")
    n = len(ds) if n is None else n
    xs, ys = zip(*(ds[i] for i in range(n)))
    return torch.stack(xs), torch.tensor(ys, dtype=torch.int64)


def test_token_mode_streamed_and_cached(digits_checkpoint, tmp_path):
    from cctk.train import load_checkpoint
    model, _ = load_checkpoint(digits_checkpoint)
    x, y = _digits_tensors(120)
    loader = DataLoader(TensorDataset(x, y), batch_size=40)
    for cache_limit in (1 << 30, 0):                        # cached features, then streamed
        result = run_snp(model, loader, loader, 10, readout_mode="token", readout_epochs=2,
                         null_draws=20, backend="torch", cache_limit_bytes=cache_limit)
        assert result.summary["config"]["readout_features_cached"] == bool(cache_limit)
        assert result.summary["blocks"][1]["ff"]["num_nodes"] == model.ff_dim
        assert 0 <= result.summary["blocks"][1]["ff"]["readout_accuracy"] <= 1
        assert result.arrays["tokens_recognized"].shape == (model.embed_dim, 10)
        assert 0 <= result.summary["tokens"]["readout_accuracy"] <= 1
    paths = save(result, str(tmp_path), plots=False)
    assert set(paths) == {"snp.json", "nodes.npz"}


def test_seqpool_readout_mode(digits_checkpoint):
    """Sequence-pooling readouts (with the group's bias-free sgd) run end to end and are
    recorded; zero-initialised they pool like the token mean; features too large to hold in
    memory are refused with a clear error."""
    from cctk.snp import analyze_group
    from cctk.snp.readout import SeqPoolReadout
    from cctk.train import load_checkpoint
    model, _ = load_checkpoint(digits_checkpoint)
    x, y = _digits_tensors(120)
    loader = DataLoader(TensorDataset(x, y), batch_size=40)
    result = run_snp(model, loader, loader, 10, readout_mode="seqpool", readout_epochs=3,
                     readout_optimizer="sgd", null_draws=20, backend="torch")
    cfg = result.summary["config"]
    assert cfg["readout_mode"] == "seqpool" and cfg["readout"]["bias"] is False
    assert 0 <= result.summary["blocks"][1]["ff"]["readout_accuracy"] <= 1
    assert result.arrays["b1_ff_recognized"].shape == (model.ff_dim, 10)
    assert result.arrays["tokens_recognized"].shape == (model.embed_dim, 10)
    # a zero-initialised sequence pooling is the token mean
    ro = SeqPoolReadout(tokens=4, nodes=3, num_classes=2)
    h = torch.randn(5, 4, 3)
    torch.testing.assert_close(ro.pool(h.reshape(5, -1)), h.mean(1))
    with pytest.raises(ValueError, match="seqpool readouts need"):
        run_snp(model, loader, loader, 10, readout_mode="seqpool", readout_epochs=1,
                null_draws=0, backend="torch", cache_limit_bytes=0)


# --------------------------------------------------------------------------- DDP

def _ddp_worker(rank, world, tmp, modes):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank,
                            world_size=world)
    try:
        model = create_model("cct_2_3x1_8", num_classes=10, embedding_dim=32, num_heads=2)
        model.load_state_dict(torch.load(os.path.join(tmp, "model.pt")))
        x, y = torch.load(os.path.join(tmp, "data.pt"))
        shard = slice(rank, None, world)                 # disjoint shards
        loader = DataLoader(TensorDataset(x[shard], y[shard]), batch_size=16)
        out = {}
        for mode in modes:
            s = collect_label_stats(model, loader, 10, mode=mode, backend="torch")
            out[mode] = {"sums": s.sums, "counts": s.counts, "final": s.final_sums,
                         "correct": s.correct, "total": s.total}
        torch.save(out, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_stats_equal_one(tmp_path):
    torch.manual_seed(0)
    model = create_model("cct_2_3x1_8", num_classes=10, embedding_dim=32, num_heads=2).eval()
    x, y = _digits_tensors(90)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torch.save((x, y), tmp_path / "data.pt")
    modes = ("pooled", "token")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path), modes), nprocs=2, join=True)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for mode in modes:
            one = collect_label_stats(model, loader, 10, mode=mode, backend="torch")
            g = got[mode]
            assert g["total"] == one.total == len(y) and g["correct"] == one.correct
            assert torch.equal(g["counts"], one.counts)
            assert sorted(g["sums"]) == sorted(one.sums)
            for key in one.sums:
                torch.testing.assert_close(g["sums"][key], one.sums[key], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(g["final"], one.final_sums, rtol=1e-5, atol=1e-5)


def test_cli_refuses_bad_options(digits_checkpoint, tmp_path, capsys):
    from cctk.cli import main
    code = main(["snp", "--checkpoint", digits_checkpoint, "--out", str(tmp_path / "x"),
                 "--threshold", "1.5"])
    assert code == 2 and "--threshold" in capsys.readouterr().err
    code = main(["snp", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "y")])
    assert code == 2 and "not found" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_run_snp_thresholds_equals_one_run_per_threshold(digits_checkpoint):
    """One measurement analysed at several thresholds gives exactly what separate runs give."""
    from cctk.snp import run_snp_thresholds
    from cctk.train import load_checkpoint
    model, _ = load_checkpoint(digits_checkpoint)
    x, y = _digits_tensors(120)
    loader = DataLoader(TensorDataset(x, y), batch_size=40)
    kw = dict(readout_epochs=2, null_draws=20, backend="torch", seed=3)
    multi = run_snp_thresholds(model, loader, loader, 10, (0.2, 0.5), **kw)
    assert set(multi) == {0.2, 0.5}
    for theta, res in multi.items():
        one = run_snp(model, loader, loader, 10, threshold=theta, **kw)
        assert res.summary == one.summary
        assert set(res.arrays) == set(one.arrays)
        for k in one.arrays:
            np.testing.assert_array_equal(res.arrays[k], one.arrays[k], err_msg=k)
    assert multi[0.2].summary["config"]["threshold"] == 0.2
    with pytest.raises(ValueError, match="threshold"):
        run_snp_thresholds(model, loader, loader, 10, (0.3, 1.5), **kw)
