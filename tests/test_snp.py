"""cctk.snp: node-matrix analysis (SCIENCE.md 3.4-3.8), heads (section 4), the statistics tap and
node matrices against an explicit per-sample field computation (3.2-3.3)."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from cctk.models import NodeTap, create_model
from cctk.snp import (analyze_heads, analyze_matrices, analyze_matrix, collect_label_stats,
                      head_coverage, mean_share, node_matrices, null_model, set_matrix,
                      summarize)


# --------------------------------------------------------------------------- analyze_matrix

def test_identity_gives_singleton_clusters():
    a = analyze_matrix(np.eye(4))
    assert a.recognized == [0, 1, 2, 3]
    assert a.clusters == [[0], [1], [2], [3]]
    assert a.noise == 0
    assert a.binary.dtype == bool and a.binary.sum() == 4


def test_label_joins_only_when_both_directions_are_one():
    M = np.eye(3)
    M[0, 1] = 0.9                         # one direction only
    a = analyze_matrix(M)
    assert a.clusters == [[0], [1], [2]]
    assert a.noise == 1                   # ones: 3 diagonal + 1, minus 1+1+1
    M[1, 0] = 0.8                         # now both directions
    a = analyze_matrix(M)
    assert a.clusters == [[0, 1], [2]]
    assert a.noise == 0


def test_greedy_cliques_in_ascending_order():
    # 0-1 linked, 1-2 linked, 0-2 not: greedy from 0 takes 1, then 2 cannot join {0, 1}
    M = np.eye(3)
    M[0, 1] = M[1, 0] = M[1, 2] = M[2, 1] = 0.5
    a = analyze_matrix(M)
    assert a.recognized == [0, 1, 2]
    assert a.clusters == [[0, 1], [2]]
    assert a.noise == 7 - (4 + 1)         # (1,2) and (2,1) lie outside the cluster blocks
    # a label outside D never enters a cluster even when fully linked
    M = np.ones((3, 3))
    M[1, 1] = 0.1
    a = analyze_matrix(M)
    assert a.recognized == [0, 2]
    assert a.clusters == [[0, 2]]
    assert a.noise == 8 - 4


def test_nonpositive_max_recognises_nothing():
    for M in (np.zeros((3, 3)), -np.ones((3, 3)) - np.eye(3)):
        a = analyze_matrix(M)
        assert a.recognized == [] and a.clusters == [] and a.noise == 0
        assert not a.binary.any() and not a.normalized.any()


def test_threshold_is_strict_and_normalised_by_global_max():
    M = np.array([[1.0, 0.3], [0.3, 0.3]])
    a = analyze_matrix(M, threshold=0.3)
    assert a.recognized == [0] and a.clusters == [[0]] and a.noise == 0
    M = np.array([[1.0, 0.30001], [0.30001, 0.30001]])
    assert analyze_matrix(M, threshold=0.3).clusters == [[0, 1]]
    # the max is off-diagonal: the diagonal 0.25 < 0.3 after normalising, only noise remains
    M = np.array([[0.5, 2.0], [0.0, 0.5]])
    a = analyze_matrix(M)
    assert a.recognized == [] and a.clusters == [] and a.noise == 1
    np.testing.assert_allclose(a.normalized, M / 2.0)


def test_noise_counts_ones_outside_cluster_blocks():
    M = np.full((4, 4), 0.1)
    np.fill_diagonal(M, 1.0)
    M[0, 3] = M[3, 0] = 0.9               # cluster {0, 3}
    M[1, 0] = M[2, 3] = 0.7               # one-directional: noise
    M[1, 2] = M[2, 1] = 0.6               # cluster {1, 2}
    a = analyze_matrix(M)
    assert a.clusters == [[0, 3], [1, 2]]
    assert a.noise == (4 + 2 + 2 + 2) - (4 + 4)


def test_analyze_matrix_rejects_non_square():
    with pytest.raises(ValueError, match="square"):
        analyze_matrix(np.ones((2, 3)))


@pytest.mark.parametrize("K", [1, 2, 5, 10, 23])
def test_batch_analysis_equals_single(K):
    rng = np.random.default_rng(K)
    n = 200
    M = rng.normal(size=(n, K, K))
    M[:, np.arange(K), np.arange(K)] += 1.5 * np.abs(rng.normal(size=(n, K)))
    M[:20] = -np.abs(M[:20])                                  # max <= 0
    M[20:40] = rng.integers(-3, 11, size=(20, K, K))          # ties at exactly 0.3 * 10
    M[40:60] = 0.6 + 0.4 * rng.random((20, K, K))             # dense: big clusters
    batch = analyze_matrices(torch.from_numpy(M), threshold=0.3)
    assert batch.recognized.shape == (n, K) and batch.cluster_id.shape == (n, K)
    for i in range(n):
        single = analyze_matrix(M[i], threshold=0.3)
        assert np.flatnonzero(batch.recognized[i]).tolist() == single.recognized
        assert batch.clusters(i) == single.clusters
        assert batch.noise[i] == single.noise
        assert batch.num_clusters[i] == len(single.clusters)
        assert batch.cluster_square_sum[i] == single.cluster_square_sum
        assert batch.ones[i] == single.binary.sum()


def test_summarize_definitions_and_zero_noise():
    M = np.stack([np.eye(3), np.zeros((3, 3)), np.ones((3, 3))])
    s = summarize(analyze_matrices(M))
    assert s["num_nodes"] == 3
    assert s["mean_recognized"] == pytest.approx((3 + 0 + 3) / 3)
    assert s["mean_clusters"] == pytest.approx((3 + 0 + 1) / 3)
    assert s["mean_cluster_size"] == pytest.approx(6 / 4)
    assert s["mean_noise"] == 0.0 and s["frac_no_cluster"] == pytest.approx(1 / 3)
    assert s["snr"] is None and s["snr_infinite"] is True          # signal > 0, noise 0
    M[0, 0, 1] = 1.0                                                # one noise entry
    s = summarize(analyze_matrices(M))
    assert s["snr"] == pytest.approx(((3 + 9) / 3) / (1 / 3))


# --------------------------------------------------------------------------- heads

def _planted(H=4, per_head=8, K=8):
    """Head h's nodes recognise only labels {2h, 2h+1}: perfect specialisation."""
    rec = np.zeros((H * per_head, K), dtype=bool)
    for h in range(H):
        rec[h * per_head:(h + 1) * per_head, [2 * h % K, (2 * h + 1) % K]] = True
    return rec


def test_coverage_and_share():
    rec = _planted()
    cov = head_coverage(rec, 4)
    assert cov.shape == (4, 8) and cov[0, 0] == 8 and cov[1, 0] == 0
    assert mean_share(cov) == 1.0
    assert mean_share(np.zeros((4, 8))) is None
    cov = np.array([[2, 0, 1], [2, 0, 3]])
    assert mean_share(cov) == pytest.approx((0.5 + 0.75) / 2)       # label 1 has no coverage


def test_null_model_is_seeded():
    rng = np.random.default_rng(0)
    rec = rng.random((32, 10)) < 0.3
    a = null_model(rec, 4, draws=50, seed=3)
    assert np.array_equal(a, null_model(rec, 4, draws=50, seed=3))
    assert not np.array_equal(a, null_model(rec, 4, draws=50, seed=4))


def _heads_from_recognized(rec, H, K):
    # SHP matrices: a head recognises the labels its nodes cover (diagonal), nothing else
    return np.stack([np.diag(head_coverage(rec, H)[h].astype(float)) for h in range(H)])


def test_planted_specialisation_beats_null():
    rec = _planted()
    out = analyze_heads(_heads_from_recognized(rec, 4, 8), rec, draws=500, seed=0)
    assert out["share_mean"] == 1.0
    assert out["p_value"] == pytest.approx(1 / 501)
    assert out["null_z"] > 5
    assert out["unique_labels"] == 8 and out["jaccard_mean"] == 0.0
    assert [h["recognized"] for h in out["heads"]] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert out["_coverage"].shape == (4, 8) and out["_heads_recognized"].sum() == 8


def test_symmetric_heads_do_not_beat_null():
    rng = np.random.default_rng(1)
    one_head = rng.random((8, 10)) < 0.4
    rec = np.concatenate([one_head] * 4)          # every head has the same nodes: minimal share
    out = analyze_heads(_heads_from_recognized(rec, 4, 10), rec, draws=300, seed=0)
    assert out["share_mean"] == pytest.approx(0.25)
    assert out["p_value"] == 1.0 and out["null_z"] < 0
    assert out["jaccard_mean"] == 1.0 and out["unique_labels"] == 0
    # independent random nodes: no specialisation beyond chance
    rec = rng.random((32, 10)) < 0.3
    out = analyze_heads(_heads_from_recognized(rec, 4, 10), rec, draws=300, seed=0)
    assert out["p_value"] > 0.05


# --------------------------------------------------------------------------- tap and matrices

def _tiny_model(K=5):
    torch.manual_seed(0)
    model = create_model("cct_2_3x1_8", num_classes=K, embedding_dim=32, num_heads=2)
    return model.eval()


def _tiny_data(K=5, n=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.arange(n) % K
    y[-3:] = 0                                    # unequal label counts
    return x, y


class _Recorder(NodeTap):
    """Plain computations, recording every node group's outputs (B, T, N)."""

    def __init__(self):
        self.out = {}

    def attention(self, block, q, k, v, dropout_p):
        o = super().attention(block, q, k, v, dropout_p)
        self.out[(block, "mha")] = o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1)
        return o

    def ff_hidden(self, block, x, linear1):
        h = super().ff_hidden(block, x, linear1)
        self.out[(block, "ff")] = h
        return h

    def stream(self, block, where, x):
        self.out[(block, where if where == "tokens" else "stream_" + where)] = x.clone()


def test_stats_tap_keeps_the_forward_and_matches_explicit_sums():
    K = 5
    model = _tiny_model(K)
    x, y = _tiny_data(K)
    with torch.no_grad():
        plain = model(x)
        rec = _Recorder()
        with model.tapped(rec):
            pooled = model.forward_features(x)
    for mode in ("pooled", "token"):
        stats = collect_label_stats(model, DataLoader(TensorDataset(x, y), batch_size=8), K,
                                    mode=mode, backend="torch", features=mode)
        assert stats.total == len(y) and stats.counts.tolist() == torch.bincount(y).tolist()
        assert stats.correct == int((plain.argmax(1) == y).sum())
        assert sorted(stats.sums) == sorted(rec.out)
        for key, nodes in rec.out.items():
            per_sample = nodes.mean(1) if mode == "pooled" else nodes
            expect = torch.stack([per_sample[y == k].sum(0) for k in range(K)])
            torch.testing.assert_close(stats.sums[key], expect, rtol=1e-4, atol=1e-5)
            flat = per_sample.reshape(len(y), -1)
            torch.testing.assert_close(stats.features[key], flat, rtol=1e-5, atol=1e-6)
        final = torch.stack([pooled[y == k].mean(0) for k in range(K)])
        torch.testing.assert_close(stats.means("final"), final, rtol=1e-4, atol=1e-5)
        if mode == "token":                        # token statistics also give the pooled means
            for key, nodes in rec.out.items():
                expect = torch.stack([nodes.mean(1)[y == k].mean(0) for k in range(K)])
                torch.testing.assert_close(stats.means(key, "pooled"), expect, rtol=1e-4, atol=1e-5)


def test_stats_with_replaced_linear1_take_the_unfused_path():
    class Wrapped(nn.Module):                    # stands for a replaced (e.g. sparse) linear1
        def __init__(self, lin):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(x)

    K = 5
    model = _tiny_model(K)
    x, y = _tiny_data(K)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    fused = collect_label_stats(model, loader, K, backend="torch")
    model.blocks[1].linear1 = Wrapped(model.blocks[1].linear1)
    unfused = collect_label_stats(model, loader, K, backend="torch")
    for key in fused.sums:
        torch.testing.assert_close(unfused.sums[key], fused.sums[key], rtol=1e-4, atol=1e-5)


def test_stats_refuse_bad_labels():
    model = _tiny_model(5)
    x, _ = _tiny_data(5, n=8)
    with pytest.raises(ValueError):
        collect_label_stats(model, [(x, torch.full((8,), 5))], 5, backend="torch")


@pytest.mark.parametrize("mode", ["pooled", "token"])
def test_node_matrices_equal_explicit_field_means(mode):
    """M_n[k, c] from label means and W equals the label mean of the explicit per-sample field
    f_{n,c}(x) = W[c, n] z_n(x) (pooled) or sum_t W[c, t, n] h_{t,n}(x) (token); and the head
    (set) matrix is the sum of its nodes' matrices."""
    K = 5
    model = _tiny_model(K)
    x, y = _tiny_data(K)
    rec = _Recorder()
    with torch.no_grad(), model.tapped(rec):
        model.forward_features(x)
    stats = collect_label_stats(model, DataLoader(TensorDataset(x, y), batch_size=10), K,
                                mode=mode, backend="torch")
    g = torch.Generator().manual_seed(1)
    for key in [(0, "mha"), (1, "ff"), (1, "stream_mha")]:
        h = rec.out[key].double()                                 # (B, T, N)
        B, T, N = h.shape
        if mode == "pooled":
            W = torch.randn(K, N, generator=g).double()
            field = W.t()[None, :, :] * h.mean(1)[:, :, None]     # (B, N, C)
        else:
            W = torch.randn(K, T, N, generator=g).double()
            field = torch.einsum("ctn,btn->bnc", W, h)
        explicit = torch.stack([field[y == k].mean(0) for k in range(K)], 1)   # (N, K, C)
        M = node_matrices(W, stats.means(key))
        torch.testing.assert_close(M, explicit, rtol=1e-4, atol=1e-6)
        head = set_matrix(W, stats.means(key), slice(0, N // 2))
        torch.testing.assert_close(head, M[: N // 2].sum(0), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs", "sgd"])
def test_readouts_learn_separable_features_and_are_seeded(optimizer):
    from cctk.snp import ReadoutConfig, readout_accuracy, train_readouts
    g = torch.Generator().manual_seed(0)
    K, n = 4, 400
    y = torch.arange(n) % K
    centers = 3 * torch.randn(K, 6, generator=g)
    feats = {(0, "mha"): centers[y] + torch.randn(n, 6, generator=g),
             (0, "ff"): torch.randn(n, 9, generator=g)}               # pure noise
    cfg = ReadoutConfig(epochs=15, optimizer=optimizer, lr=0.01 if optimizer == "sgd" else 0.05,
                        batch_size=64, seed=3)
    readouts = train_readouts(feats, y, K, cfg)
    # the group's readout (sgd) has no bias and weight decay 1e-3; the others a bias, no decay
    assert (readouts[(0, "mha")].bias is None) == (optimizer == "sgd")
    assert cfg.weight_decay == (1e-3 if optimizer == "sgd" else 0.0)
    acc = readout_accuracy(readouts, feats, y)
    assert acc[(0, "mha")] > 0.95 and acc[(0, "ff")] < 0.6
    again = train_readouts(feats, y, K, cfg)
    assert torch.equal(again[(0, "mha")].weight, readouts[(0, "mha")].weight)
    with pytest.raises(ValueError, match="optimizer"):
        ReadoutConfig(optimizer="rmsprop")


@pytest.mark.parametrize("mode", ["pooled", "token"])
def test_stats_triton_backend_equals_torch(mode):
    """The tap through the Triton kernels (interpreter on CPU) gives the torch backend's sums."""
    pytest.importorskip("triton")
    K = 5
    model = _tiny_model(K)
    x, y = _tiny_data(K, n=12)
    loader = DataLoader(TensorDataset(x, y), batch_size=6)
    ref = collect_label_stats(model, loader, K, mode=mode, backend="torch")
    tri = collect_label_stats(model, loader, K, mode=mode, backend="triton")
    assert tri.correct == ref.correct and torch.equal(tri.counts, ref.counts)
    for key in ref.sums:
        torch.testing.assert_close(tri.sums[key], ref.sums[key], rtol=1e-4, atol=1e-4)
