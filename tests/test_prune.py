"""cctk.prune: ANDC scores, permutations (each alone function preserving), block masks, the
magnitude baseline, conversion to ANDCLinear, pruned checkpoints and `cctk prune`."""
import copy
import json

import numpy as np
import pytest
import torch

import cctk.prune as P
import cctk.prune.masks as PM
import cctk.prune.permute as PP
from cctk.models import create_model
from cctk.prune.andc import RecognizedSets

K = 10


def tiny_model(seed=0, **kw):
    """A small CCT (d=64, 2 heads of 32, d_ff=128, 2 blocks) whose every parameter is redrawn
    at O(1) scale, so the outputs are far from zero and any mis-permutation shows."""
    torch.manual_seed(seed)
    cfg = dict(embedding_dim=64, num_heads=2, mlp_ratio=2.0)
    cfg.update(kw)
    m = create_model("cct_2_3x1_8", num_classes=K, **cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "positional_emb" in name:
                p.normal_(0, 0.5)
            elif p.dim() == 1:
                p.normal_(1.0 if name.endswith("norm.weight") or "norm1.weight" in name else 0.0, 0.3)
            else:
                p.normal_(0, 1.0 / p.shape[-1] ** 0.5 if p.dim() == 2 else 0.3)
    return m


def images(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g)


def random_sets(model, seed=0, p_noise=0.1):
    """Label sets with structure: every node has a dominant label plus noise; a few empty nodes."""
    g = torch.Generator().manual_seed(seed)

    def rs(n):
        s = torch.zeros(n, K, dtype=torch.bool)
        s[torch.arange(n), torch.randint(0, K, (n,), generator=g)] = True
        s |= torch.rand(n, K, generator=g) < p_noise
        s[torch.rand(n, generator=g) < 0.05] = False
        return s

    d, H, dff = model.embed_dim, model.num_heads, model.ff_dim
    sets = {"final_recognized": rs(d)}
    for b in range(model.num_blocks):
        sets[f"b{b}_mha_recognized"] = rs(d)
        sets[f"b{b}_ff_recognized"] = rs(dff)
        sets[f"b{b}_stream_mha_recognized"] = rs(d)
        sets[f"b{b}_stream_ff_recognized"] = rs(d)
        sets[f"b{b}_heads_recognized"] = torch.rand(H, K, generator=g) < 0.5
    sets["tokens_recognized"] = rs(d)   # the stream entering block 0, measured by `cctk snp`
    return sets


def outputs(model, x):
    with torch.no_grad():
        return model(x)


# ---------------------------------------------------------------------------------------------
# scores and masks


def test_overlap_scores_hand_made():
    D_out = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    D_in = torch.tensor([[1, 0, 0, 0], [0, 1, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
    s = PM.overlap_scores(D_out, D_in)
    expected = torch.tensor([[1, 1, 2], [0, 0, 0], [1, 2, 3]])
    assert torch.equal(s, expected)
    keep = PM.connection_keep(s, 1)
    assert torch.equal(keep, expected >= 1)
    assert not keep[1].any()  # an empty-label node loses every connection
    assert torch.equal(PM.connection_keep(s, 2), expected >= 2)
    with pytest.raises(ValueError, match="min_overlap"):
        PM.connection_keep(s, 0)
    with pytest.raises(ValueError, match="same number of labels"):
        PM.overlap_scores(D_out, D_in[:, :3])


def test_classifier_keep_is_transposed_final_sets():
    final = torch.tensor([[1, 0, 0], [0, 1, 1], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)  # (d=4, K=3)
    m = PM.classifier_keep(final)
    assert m.shape == (3, 4)
    assert m[0].tolist() == [True, False, False, True]   # label 0 from nodes 0 and 3
    assert m[2].tolist() == [False, True, False, True]
    assert not m[:, 2].any()                              # node 2 recognises nothing


def test_block_reduce_and_expand_partial_edges():
    x = torch.arange(5 * 7, dtype=torch.float64).view(5, 7)
    r = PM.block_reduce(x, 4)
    assert r.shape == (2, 2)
    assert r[0, 0] == x[:4, :4].sum() and r[1, 1] == x[4:, 4:].sum()
    bm = torch.tensor([[True, False], [False, True]])
    full = PM.expand_block_mask(bm, 4, (5, 7))
    assert full.shape == (5, 7) and full[:4, :4].all() and not full[:4, 4:].any() and full[4:, 4:].all()


@pytest.mark.parametrize("density", [1.0, 0.5, 0.25, 0.125])
def test_andc_block_mask_hits_target_density(density):
    g = torch.Generator().manual_seed(0)
    D_out = torch.rand(96, K, generator=g) < 0.2
    D_in = torch.rand(64, K, generator=g) < 0.2
    s = PM.overlap_scores(D_out, D_in)
    keep = PM.connection_keep(s)
    bm = PM.andc_block_mask(s, keep, 16, density=density)
    assert bm.shape == (6, 4)
    assert int(bm.sum()) == round(density * 24)
    # the kept blocks are those of highest kept fraction (the default), or of highest summed
    # kept score with block_score="sum"
    for score, bs in (("kept-fraction", PM.kept_fraction(keep, 16)), ("sum", PM.block_reduce(s.double() * keep, 16))):
        bm = PM.andc_block_mask(s, keep, 16, density=density, block_score=score)
        assert int(bm.sum()) == round(density * 24)
        assert bs[bm].min() >= bs[~bm].max() if (~bm).any() else True


def test_andc_block_mask_tau_threshold():
    s = torch.zeros(32, 32, dtype=torch.int64)
    s[:16, :16] = 2              # block (0,0) fully kept
    s[16:, :4] = 1               # block (1,0): 4/16 columns kept -> fraction 0.25
    keep = PM.connection_keep(s)
    bm = PM.andc_block_mask(s, keep, 16, tau=0.5)
    assert bm.tolist() == [[True, False], [False, False]]
    bm = PM.andc_block_mask(s, keep, 16, tau=0.25)
    assert bm.tolist() == [[True, False], [True, False]]
    bm = PM.andc_block_mask(s, keep, 16, tau=0.0)  # tau 0 keeps blocks with any kept connection
    assert bm.tolist() == [[True, False], [True, False]]
    with pytest.raises(ValueError, match="exactly one"):
        PM.andc_block_mask(s, keep, 16)


def test_magnitude_block_mask_keeps_largest_blocks():
    w = torch.randn(48, 32) * 0.01
    w[16:32, 0:16] += 5.0
    w[32:48, 16:32] -= 3.0
    bm = PM.magnitude_block_mask(w, 16, n_keep=2)
    assert bm.tolist() == [[False, False], [True, False], [False, True]]
    assert int(PM.magnitude_block_mask(w, 16, density=0.5).sum()) == 3
    em = PM.magnitude_element_mask(w, 10)
    assert int(em.sum()) == 10 and w.abs()[em].min() >= w.abs()[~em].max()


# ---------------------------------------------------------------------------------------------
# permutations: each alone leaves the outputs unchanged


def test_permute_ff_preserves_outputs():
    m = tiny_model()
    x = images()
    y = outputs(m, x)
    for b in range(m.num_blocks):
        PP.permute_ff(m, b, torch.randperm(m.ff_dim))
    torch.testing.assert_close(outputs(m, x), y, atol=1e-5, rtol=1e-5)
    # sensitivity: permuting linear1's rows without linear2's columns changes the outputs
    bad = copy.deepcopy(m)
    with torch.no_grad():
        bad.blocks[0].linear1.weight.copy_(bad.blocks[0].linear1.weight[torch.randperm(m.ff_dim)])
    assert (outputs(bad, x) - y).abs().max() > 1e-3


@pytest.mark.parametrize("which", ["qk", "v"])
def test_permute_head_dims_preserves_outputs(which):
    m = tiny_model()
    x = images()
    y = outputs(m, x)
    before = m.blocks[1].self_attn.qkv.weight.clone()
    for b in range(m.num_blocks):
        for h in range(m.num_heads):
            p = torch.randperm(m.head_dim)
            if which == "qk":
                PP.permute_head_dims(m, b, h, perm_qk=p)
            else:
                PP.permute_head_dims(m, b, h, perm_v=p)
    assert not torch.equal(before, m.blocks[1].self_attn.qkv.weight)
    torch.testing.assert_close(outputs(m, x), y, atol=1e-5, rtol=1e-5)
    # sensitivity: q rows alone (without k) break the function
    bad = copy.deepcopy(m)
    dh = m.head_dim
    with torch.no_grad():
        w = bad.blocks[0].self_attn.qkv.weight
        w[:dh] = w[:dh][torch.randperm(dh)]
    assert (outputs(bad, x) - y).abs().max() > 1e-4


def test_permute_stream_preserves_outputs():
    for pe in ("learnable", "sine"):
        m = tiny_model(positional_embedding=pe)
        x = images()
        y = outputs(m, x)
        perm = torch.randperm(m.embed_dim)
        PP.permute_stream(m, perm)
        torch.testing.assert_close(outputs(m, x), y, atol=1e-5, rtol=1e-5)
    # sensitivity: leaving out one tensor (the final norm) breaks it
    m = tiny_model()
    y = outputs(m, x)
    w, b = m.classifier.norm.weight.clone(), m.classifier.norm.bias.clone()
    PP.permute_stream(m, perm)
    with torch.no_grad():
        m.classifier.norm.weight.copy_(w)
        m.classifier.norm.bias.copy_(b)
    assert (outputs(m, x) - y).abs().max() > 1e-3


def test_permutations_validate_input():
    m = tiny_model()
    with pytest.raises(ValueError, match="permutation"):
        PP.permute_stream(m, torch.arange(m.embed_dim - 1))
    with pytest.raises(ValueError, match="permutation"):
        PP.permute_ff(m, 0, torch.zeros(m.ff_dim, dtype=torch.long))
    with pytest.raises(ValueError, match="head"):
        PP.permute_head_dims(m, 0, m.num_heads, perm_qk=torch.arange(m.head_dim))


def test_label_order_groups_labels():
    sets = torch.zeros(8, 4, dtype=torch.bool)
    for n, k in enumerate([2, 0, 3, 0, 2, 1, 3, 1]):
        sets[n, k] = True
    sets[5] = False  # empty node goes last
    for method in ("dominant", "lexicographic"):
        order = PP.label_order(sets, method)
        assert sorted(order.tolist()) == list(range(8))
        assert order[-1].item() == 5
        labels = [int(sets[i].float().argmax()) for i in order[:-1]]
        assert labels == sorted(labels)
    assert torch.equal(PP.label_order(sets, "identity"), torch.arange(8))


# ---------------------------------------------------------------------------------------------
# whole-model pruning


def test_prune_andc_permuted_dense_equals_original():
    m = tiny_model()
    x = images()
    sets = random_sets(m)
    pm, plan = P.prune_andc(m, sets, block_size=16, density=1.0, prune_classifier=False)
    assert plan.permutations is not None
    torch.testing.assert_close(outputs(pm, x), outputs(m, x), atol=1e-5, rtol=1e-5)
    assert P.density_summary(pm)["linear_density"] == 1.0


def test_prune_andc_masks_follow_label_sets():
    m = tiny_model()
    sets = random_sets(m)
    pm, plan = P.prune_andc(m, sets, block_size=16, density=0.25, order="dominant")
    summ = P.density_summary(pm)
    for name, dens in summ["layers"].items():
        assert dens == pytest.approx(0.25, abs=1e-9), name
    # classifier: exactly the final-stream sets (in the permuted order)
    rs = RecognizedSets.from_snp(sets).permuted(plan.permutations)
    assert torch.equal(pm.classifier.fc.mask, rs.final.t())
    assert summ["classifier_density"] == pytest.approx(float(rs.final.double().mean()))
    # kept blocks have the highest fraction of kept connections (the default block score); block
    # 0's qkv reads the measured token sets
    assert not plan.tokens_assumed and plan.rule["token_sets"] == "measured"
    s = PM.overlap_scores(rs.ff[0], rs.stream_mha[0])
    kept = PM.kept_fraction(s >= 1, 16)
    bm = plan.block_masks["classifier.blocks.0.linear1"]
    assert kept[bm].min() >= kept[~bm].max()
    # pruned weights are zero in the masked forward
    lin = pm.get_submodule("classifier.blocks.0.linear1")
    assert torch.equal(lin.masked_weight() != 0, lin.mask & (lin.weight != 0))


def test_label_sorting_gathers_score_into_blocks():
    m = tiny_model()
    sets = random_sets(m, p_noise=0.03)
    _, ident = P.prune_andc(m, sets, block_size=16, density=0.25, order="identity")
    _, dom = P.prune_andc(m, sets, block_size=16, density=0.25, order="dominant")
    cap = lambda plan: sum(v["captured_fraction"] for v in plan.layer_stats.values())  # noqa: E731
    assert cap(dom) > cap(ident) * 1.1


def test_empty_label_nodes_lose_connections():
    m = tiny_model()
    sets = random_sets(m)
    sets["b0_ff_recognized"][:] = False
    pm, plan = P.prune_andc(m, sets, block_size=16, tau=0.01)
    assert not plan.block_masks["classifier.blocks.0.linear1"].any()
    assert not plan.block_masks["classifier.blocks.0.linear2"].any()


def test_magnitude_baseline_same_per_layer_densities():
    m = tiny_model()
    sets = random_sets(m)
    pa, plan = P.prune_andc(m, sets, block_size=16, tau=0.3)
    pmag, mplan = P.prune_magnitude(m, 16, blocks_kept=plan.blocks_kept(),
                                    classifier_kept=int(plan.classifier_mask.sum()))
    assert mplan.blocks_kept() == plan.blocks_kept()
    a, b = P.density_summary(pa), P.density_summary(pmag)
    assert a["layers"] == b["layers"]
    assert a["classifier_density"] == b["classifier_density"]
    for name, bm in mplan.block_masks.items():
        w = m.get_submodule(name).weight
        norms = PM.block_reduce(w.abs(), 16)
        if bm.any() and (~bm).any():
            assert norms[bm].min() >= norms[~bm].max()


def test_budget_block_mask_whole_layer_and_split_bands():
    g = torch.Generator().manual_seed(0)
    primary, tie = torch.rand(12, 5, generator=g), torch.rand(12, 5, generator=g)
    whole = PM.budget_block_mask(primary, 0.25, tie)
    assert torch.equal(whole, PM.topk_block_mask(primary, PM.num_blocks_to_keep(0.25, 60), tie))
    split = PM.budget_block_mask(primary, 0.25, tie, groups=3)
    for band in range(3):   # q, k, v each keep round(0.25 * 20) = 5 blocks: their own best ones
        rows = slice(4 * band, 4 * band + 4)
        assert int(split[rows].sum()) == 5
        assert torch.equal(split[rows], PM.topk_block_mask(primary[rows], 5, tie[rows]))
    with pytest.raises(ValueError, match="cannot be split into 3"):
        PM.budget_block_mask(torch.rand(4, 5), 0.25, groups=3)
    per = PM.budget_block_mask(primary, (0.1, 0.5, 0.0), tie, groups=3)   # one density per band
    assert [int(per[4 * b:4 * b + 4].sum()) for b in range(3)] == [2, 10, 0]
    with pytest.raises(ValueError, match="2 densities for 3"):
        PM.budget_block_mask(primary, (0.1, 0.5), tie, groups=3)


@pytest.mark.parametrize("method", ["andc", "magnitude", "random"])
def test_split_qkv_budget_gives_q_k_and_v_each_the_density(method):
    """``qkv_budget="split"``: every block method keeps the density in each of q, k and v (a fused
    qkv scored as one layer can hand v's budget to q and k: seen on Fashion-MNIST, where ANDC's
    head-wide q/k sets out-score the v rows' node sets and v kept no block); the other layers and
    the fused budget are unchanged; split is the default."""
    m = tiny_model()
    sets = random_sets(m)
    spec = dict(density=0.25, block_size=16, classifier=False, seed=0)
    _, fused = P.prune_model(m, P.PruneSpec(method, qkv_budget="fused", **spec), sets)
    _, split = P.prune_model(m, P.PruneSpec(method, qkv_budget="split", **spec), sets)
    _, default = P.prune_model(m, P.PruneSpec(method, **spec), sets)
    assert all(torch.equal(default.block_masks[n], bm) for n, bm in split.block_masks.items())
    for name, bm in split.block_masks.items():
        if name.endswith("qkv"):
            bands = bm.reshape(3, -1, bm.shape[1])
            per = bands[0].numel()
            assert [int(b.sum()) for b in bands] == [PM.num_blocks_to_keep(0.25, per)] * 3, name
        else:
            assert torch.equal(bm, fused.block_masks[name]), name
    assert sum(int(b.sum()) for b in fused.block_masks.values()) == sum(int(b.sum()) for b in split.block_masks.values())
    with pytest.raises(ValueError, match="qkv_budget"):
        P.prune_model(m, P.PruneSpec(method, qkv_budget="bogus", **spec), sets)


def test_finetune_keeps_masks_fixed():
    from torch.utils.data import DataLoader, TensorDataset

    m = tiny_model()
    pm, plan = P.prune_andc(m, random_sets(m), block_size=16, density=0.5)
    x = torch.randn(64, 1, 8, 8)
    y = torch.randint(0, K, (64,))
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    lin = pm.get_submodule("classifier.blocks.1.linear2")
    before = lin.masked_weight().detach().clone()
    hist = P.finetune(pm, loader, epochs=1, lr=1e-3)
    after = lin.masked_weight().detach()
    assert len(hist) == 1 and np.isfinite(hist[0]["train_loss"])
    assert torch.equal(after[~lin.mask], before[~lin.mask])  # zeros stay zero
    assert not torch.equal(after[lin.mask], before[lin.mask])


# ---------------------------------------------------------------------------------------------
# ANDCLinear conversion and checkpoints


def test_convert_to_andc_preserves_masked_outputs():
    from cctk.nn import ANDCLinear

    m = tiny_model()
    x = images()
    pm, plan = P.prune_andc(m, random_sets(m), block_size=16, density=0.25)
    y = outputs(pm, x)
    P.convert_to_andc(pm)
    for name in P.encoder_linear_names(pm):
        assert isinstance(pm.get_submodule(name), ANDCLinear)
    torch.testing.assert_close(outputs(pm, x), y, atol=1e-5, rtol=1e-5)
    assert P.density_summary(pm)["linear_density"] == pytest.approx(0.25)
    dense_twin = P.to_masked_dense(copy.deepcopy(pm))
    torch.testing.assert_close(outputs(dense_twin, x), y, atol=1e-5, rtol=1e-5)


def test_pruned_checkpoint_round_trip(tmp_path):
    m = tiny_model()
    x = images()
    pm, plan = P.prune_andc(m, random_sets(m), block_size=16, density=0.25)
    P.convert_to_andc(pm)
    y = outputs(pm, x)
    path = P.save_pruned(pm, plan, tmp_path / "pruned.pt", metrics={"accuracy": 0.5})
    raw = torch.load(path, weights_only=True)  # plain tensors and containers only
    assert "classifier.blocks.0.linear1.weight" not in raw["state_dict"]  # no dense weights
    loaded, ckpt = P.load_pruned(path)
    torch.testing.assert_close(outputs(loaded, x), y, atol=0, rtol=0)
    assert ckpt["pruning"]["block_size"] == 16
    assert P.density_summary(loaded) == P.density_summary(pm)


def test_pruned_checkpoint_masked_modules_round_trip(tmp_path):
    m = tiny_model()
    x = images()
    pm, plan = P.prune_andc(m, random_sets(m), block_size=16, density=0.5)
    y = outputs(pm, x)
    path = P.save_pruned(pm, plan, tmp_path / "masked.pt")
    loaded, _ = P.load_pruned(path)
    torch.testing.assert_close(outputs(loaded, x), y, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# `cctk prune` on a tiny checkpoint


def _tiny_checkpoint(tmp_path):
    from cctk.checkpoint import atomic_save, checkpoint_provenance
    from cctk.train.state import checkpoint_dict

    m = tiny_model()
    ckpt = checkpoint_dict(model=m, dataset={"name": "digits", "data_dir": None, "img_size": 8, "in_channels": 1,
                                             "num_classes": K}, train_config={}, epoch=1)
    path = tmp_path / "dense.pt"
    atomic_save(ckpt, str(path))
    snp_dir = tmp_path / "snp"
    snp_dir.mkdir()
    # the provenance `cctk snp` records in both files (cctk prune refuses an SNP of another checkpoint)
    provenance = checkpoint_provenance(path)
    np.savez(snp_dir / "nodes.npz", **{k: v.numpy() for k, v in random_sets(m).items()},
             checkpoint_sha256=np.array(provenance["checkpoint_sha256"]))
    (snp_dir / "snp.json").write_text(json.dumps({"config": provenance}))
    return m, path, snp_dir


def test_cli_prune_andc_and_magnitude(tmp_path, capsys):
    from cctk.cli import main

    m, ckpt, snp_dir = _tiny_checkpoint(tmp_path)
    out = tmp_path / "andc"
    rc = main(["prune", "--checkpoint", str(ckpt), "--snp", str(snp_dir), "--density", "0.25", "--block-size", "16",
               "--finetune-epochs", "1", "--method", "andc", "--out", str(out), "--subset", "64",
               "--classifier-threshold", "0.5", "--device", "cpu"])
    assert rc == 0
    rec = json.loads((out / "prune.json").read_text())
    assert rec["method"] == "andc" and rec["linear_density"] == pytest.approx(0.25)
    for key in ("dense_accuracy", "accuracy_before_finetune", "accuracy", "classifier_density", "layers"):
        assert key in rec
    assert set(rec["layers"]) == set(P.encoder_linear_names(m))
    loaded, ck = P.load_pruned(out / "checkpoint.pt")
    assert ck["dataset"]["name"] == "digits"
    assert P.density_summary(loaded)["classifier_density"] == pytest.approx(rec["classifier_density"])
    # `cctk eval` loads the pruned checkpoint (no dense weights of pruned layers)
    report = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--subset", "64", "--device", "cpu",
                 "--out", str(report)]) == 0
    assert json.loads(report.read_text())["samples"] == 64
    # magnitude with the same SNP dir: the same per-layer densities
    out_m = tmp_path / "mag"
    assert main(["prune", "--checkpoint", str(ckpt), "--snp", str(snp_dir), "--density", "0.25", "--block-size", "16",
                 "--finetune-epochs", "0", "--method", "magnitude", "--out", str(out_m), "--subset", "64",
                 "--classifier-threshold", "0.5", "--device", "cpu"]) == 0
    rec_m = json.loads((out_m / "prune.json").read_text())
    assert rec_m["layers"] == rec["layers"] and rec_m["classifier_density"] == rec["classifier_density"]


@pytest.mark.parametrize("method,snp", [("structured", True), ("structured-activation", False)])
def test_cli_prune_structured_writes_a_smaller_dense_checkpoint(tmp_path, method, snp):
    """`cctk prune --method structured*`: a smaller dense CCT whose checkpoint reloads to the same
    function, and that `cctk eval` runs."""
    from cctk.cli import main
    from cctk.nn import MaskedLinear
    from cctk.prune.pruner import PruneSpec, prune_model
    from cctk.prune.workflow import calibration_batches, data_loaders

    m, ckpt, snp_dir = _tiny_checkpoint(tmp_path)
    out = tmp_path / method
    args = ["prune", "--checkpoint", str(ckpt), "--density", "0.5", "--finetune-epochs", "1", "--method", method,
            "--out", str(out), "--subset", "64", "--device", "cpu"] + (["--snp", str(snp_dir)] if snp else [])
    assert main(args) == 0
    rec = json.loads((out / "prune.json").read_text())
    assert rec["method"] == method and rec["finetune_layers"] == "smaller dense"
    assert rec["linear_density"] == pytest.approx(0.5, abs=0.05) and rec["classifier_density"] == 1.0
    loaded, ck = P.load_pruned(out / "checkpoint.pt")
    widths = ck["pruning"]["structured"]
    for b, blk in enumerate(loaded.blocks):
        assert blk.linear1.out_features == widths[str(b)]["ff"] < m.blocks[b].linear1.out_features
        assert blk.self_attn.qkv.out_features == 3 * m.num_heads * widths[str(b)]["head_dim"]
        assert not any(isinstance(x, MaskedLinear) for x in loaded.modules())
    # the reloaded model is the pruned one: the same function as a fresh prune + the saved weights
    data_loader, _, _ = data_loaders(ck["dataset"], train_subset=64)
    fresh, _ = prune_model(m, PruneSpec(method, density=0.5),
                           P.RecognizedSets.from_snp(snp_dir, num_blocks=m.num_blocks) if snp else None,
                           calibration=calibration_batches(data_loader.dataset))
    fresh.load_state_dict(loaded.state_dict())   # same shapes: strict load succeeds
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(loaded(x), fresh.eval()(x))
    report = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--subset", "64", "--device", "cpu",
                 "--out", str(report)]) == 0
    assert json.loads(report.read_text())["accuracy"] == pytest.approx(rec["accuracy"])


@pytest.mark.parametrize("method", ["wanda", "random", "andc-shuffled", "andc-magnitude"])
def test_cli_prune_every_block_method(tmp_path, method):
    from cctk.cli import main

    m, ckpt, snp_dir = _tiny_checkpoint(tmp_path)
    out = tmp_path / method
    assert main(["prune", "--checkpoint", str(ckpt), "--snp", str(snp_dir), "--density", "0.25", "--block-size", "16",
                 "--finetune-epochs", "0", "--method", method, "--out", str(out), "--subset", "64",
                 "--device", "cpu", "--seed", "3"]) == 0
    rec = json.loads((out / "prune.json").read_text())
    assert rec["method"] == method and rec["linear_density"] == pytest.approx(0.25)
    loaded, _ = P.load_pruned(out / "checkpoint.pt")
    assert P.density_summary(loaded)["linear_density"] == pytest.approx(0.25)


def test_prune_model_tau_gives_every_block_method_andc_per_layer_densities():
    from cctk.prune.pruner import PruneSpec, prune_model

    m = tiny_model()
    sets = random_sets(m)
    _, plan = prune_model(m, PruneSpec("andc", block_size=16, tau=0.3), sets)
    ref = plan.blocks_kept()
    for method in ("magnitude", "random"):
        _, p2 = prune_model(m, PruneSpec(method, block_size=16, tau=0.3), sets)
        assert p2.blocks_kept() == ref, method
        for name, bm in p2.block_masks.items():   # a split qkv: q, k and v each keep ANDC's count
            if name.endswith("qkv"):
                assert [int(b.sum()) for b in bm.chunk(3, 0)] == \
                       [int(b.sum()) for b in plan.block_masks[name].chunk(3, 0)], (method, name)
        assert int(p2.classifier_mask.sum()) == int(plan.classifier_mask.sum())
    with pytest.raises(ValueError, match="not tau"):
        prune_model(m, PruneSpec("structured-activation", tau=0.3), None, calibration=[torch.randn(4, 1, 8, 8)])
    with pytest.raises(ValueError, match="needs the SNP"):
        prune_model(m, PruneSpec("magnitude", tau=0.3), None)


def test_structured_andc_hybrid_removes_nodes_then_prunes_blocks():
    from cctk.nn import MaskedLinear
    from cctk.prune.pruner import PruneSpec, hybrid_node_fraction, prune_model

    m = tiny_model()
    sets = RecognizedSets.from_snp(random_sets(m), num_blocks=m.num_blocks)
    calib = [torch.randn(8, 1, 8, 8)]
    # d_ff 128, 2 heads of 32, 16-blocks: fractions on the 1/8 grid that tile are multiples of 1/4
    assert hybrid_node_fraction(m, 0.25, 16) == 0.5
    assert hybrid_node_fraction(m, 0.5, 16) == 0.75
    assert hybrid_node_fraction(m, 0.125, 16) == 0.25
    pruned, plan = prune_model(m, PruneSpec("structured-andc", block_size=16, density=0.25), sets, calibration=calib)
    assert plan.method == "structured-andc"
    assert plan.structured == {str(b): {"ff": 64, "head_dim": 16} for b in range(m.num_blocks)}
    assert (pruned.ff_dim, pruned.head_dim) == (64, 16)               # the model-level widths follow
    assert P.relative_linear_density(m, pruned) == pytest.approx(0.25, abs=0.02)
    masked = [n for n in P.encoder_linear_names(pruned) if isinstance(pruned.get_submodule(n), MaskedLinear)]
    assert len(masked) == 4 * m.num_blocks
    for n in masked:                                                  # half the smaller layers' blocks
        assert float(pruned.get_submodule(n).block_mask.float().mean()) == pytest.approx(0.5, abs=0.05)
    # the node removal is the SNP-ranked structured pruning at the node fraction
    small, _ = prune_model(m, PruneSpec("structured", density=0.5), sets, calibration=calib)
    assert [b.linear1.out_features for b in small.blocks] == [b.linear1.out_features for b in pruned.blocks]
    # ANDCLinear conversion keeps the function
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        y = pruned(x)
        P.convert_to_andc(pruned)
        torch.testing.assert_close(pruned(x), y, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="SNP label sets"):
        prune_model(m, PruneSpec("structured-andc", density=0.25), None, calibration=calib)


def test_select_nodes_matches_remove_nodes():
    m = tiny_model()
    sets = RecognizedSets.from_snp(random_sets(m), num_blocks=m.num_blocks)
    ff_keep = {0: torch.tensor([5, 1, 9]), 1: torch.arange(0, 128, 2)}
    head_keep = {0: torch.tensor([[0, 3], [31, 2]]), 1: torch.tensor([[4, 5], [6, 7]])}
    sub = sets.select_nodes(ff_keep, head_keep, head_dim=m.head_dim)
    assert torch.equal(sub.ff[0], sets.ff[0][torch.tensor([1, 5, 9])])         # in the model's (sorted) order
    assert torch.equal(sub.mha[0], sets.mha[0][torch.tensor([0, 3, 32 + 2, 32 + 31])])
    assert torch.equal(sub.heads[0], sets.heads[0]) and torch.equal(sub.final, sets.final)
    from cctk.prune.structured import remove_nodes
    small = remove_nodes(m, ff_keep, head_keep)
    assert sub.ff[1].shape[0] == small.blocks[1].linear1.out_features
    assert sub.mha[0].shape[0] == small.blocks[0].self_attn.proj.in_features
    # FF widths differ across blocks (3, 64): ff_dim stays; every head keeps 2 dims: head_dim follows
    assert (small.ff_dim, small.head_dim) == (m.ff_dim, 2)


@pytest.mark.parametrize("method", ["structured-andc"])
def test_cli_prune_hybrid_checkpoint_reloads(tmp_path, method):
    from cctk.cli import main

    m, ckpt, snp_dir = _tiny_checkpoint(tmp_path)
    out = tmp_path / method
    assert main(["prune", "--checkpoint", str(ckpt), "--snp", str(snp_dir), "--density", "0.25", "--block-size", "16",
                 "--finetune-epochs", "1", "--method", method, "--out", str(out), "--subset", "64",
                 "--device", "cpu"]) == 0
    rec = json.loads((out / "prune.json").read_text())
    assert rec["linear_density"] == pytest.approx(0.25, abs=0.02) and rec["finetune_layers"] == "masked dense"
    loaded, ck = P.load_pruned(out / "checkpoint.pt")
    assert ck["pruning"]["structured"]["0"] == {"ff": 64, "head_dim": 16} and loaded.head_dim == 16
    assert P.relative_linear_density(m, loaded) == pytest.approx(rec["linear_density"])
    report = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--subset", "64", "--device", "cpu",
                 "--out", str(report)]) == 0
    assert json.loads(report.read_text())["accuracy"] == pytest.approx(rec["accuracy"])


def test_cli_prune_bad_input(tmp_path, capsys):
    from cctk.cli import main

    _, ckpt, snp_dir = _tiny_checkpoint(tmp_path)
    for method in ("andc", "structured", "andc-shuffled"):
        assert main(["prune", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x"), "--method", method]) == 2
        assert "--snp" in capsys.readouterr().err
    assert main(["prune", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x"), "--method", "structured-activation",
                 "--tau", "0.3"]) == 2
    assert "--density" in capsys.readouterr().err
    assert main(["prune", "--checkpoint", str(ckpt), "--snp", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "nodes.npz" in capsys.readouterr().err
    assert main(["prune", "--checkpoint", str(ckpt), "--snp", str(snp_dir), "--density", "1.5",
                 "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_finetune_through_andclinear_sparse_autograd():
    from torch.utils.data import DataLoader, TensorDataset

    from cctk.nn import ANDCLinear

    m = tiny_model()
    pm, plan = P.prune_andc(m, random_sets(m), block_size=16, density=0.25)
    P.convert_to_andc(pm)
    lin = pm.get_submodule("classifier.blocks.0.linear1")
    assert isinstance(lin, ANDCLinear)
    before = lin.to_dense().detach().clone()
    loader = DataLoader(TensorDataset(torch.randn(48, 1, 8, 8), torch.randint(0, K, (48,))), batch_size=16)
    hist = P.finetune(pm, loader, epochs=1, lr=1e-3)
    after = lin.to_dense().detach()
    kept = PM.expand_block_mask(plan.block_masks["classifier.blocks.0.linear1"], 16, after.shape)
    assert np.isfinite(hist[0]["train_loss"])
    assert torch.equal(after[~kept], torch.zeros_like(after[~kept]))  # pruned blocks stay pruned
    assert not torch.equal(after[kept], before[kept])
    assert P.density_summary(pm)["linear_density"] == pytest.approx(0.25)


def test_cli_prune_refuses_snp_without_token_sets_unless_assumed(tmp_path, capsys):
    """An SNP directory written before cctk measured the tokens: ANDC is refused with one line
    saying to rerun `cctk snp`; --token-sets assume-all runs the old assumption, recorded."""
    from cctk.cli import main

    m, ckpt, snp_dir = _tiny_checkpoint(tmp_path)
    arrays = dict(np.load(snp_dir / "nodes.npz"))
    del arrays["tokens_recognized"]
    np.savez(snp_dir / "nodes.npz", **arrays)
    base = ["prune", "--checkpoint", str(ckpt), "--snp", str(snp_dir), "--density", "0.25", "--block-size", "16",
            "--finetune-epochs", "0", "--subset", "32", "--device", "cpu"]
    for method in ("andc", "andc-shuffled", "andc-old+tokens"):
        assert main(base + ["--method", method, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "rerun `cctk snp" in err and "--token-sets assume-all" in err
        assert not (tmp_path / "x").exists()
    out = tmp_path / "assumed"
    assert main(base + ["--method", "andc", "--token-sets", "assume-all", "--block-score", "sum", "--v-sets", "head",
                        "--out", str(out)]) == 0
    rec = json.loads((out / "prune.json").read_text())
    assert rec["rule"]["token_sets"] == "assume-all" and rec["tokens_assumed_all_labels"] is True
    assert rec["rule"]["block_score"] == "sum" and rec["rule"]["v_sets"] == "head"
    # the old rule itself (andc-old) needs no token sets; magnitude reads none
    for method in ("andc-old", "magnitude"):
        assert main(base + ["--method", method, "--out", str(tmp_path / method)]) == 0
