"""cctk.prune.scorers: every scorer through prune_blocks / prune_nodes (masks at the requested
density, seeding, the shuffled-label control, structured removal equal to node masking)."""
import pytest
import torch
import torch.nn as nn

import cctk.prune.scorers as S
from cctk.prune import prune_andc
from cctk.prune.andc import RecognizedSets
from cctk.prune.masks import block_grid, num_blocks_to_keep

from test_prune import images, outputs, random_sets, tiny_model

B = 16


def _calib():
    return [images(8, seed=5), images(8, seed=6)]


def _scorer(method, model, seed=0):
    sets = RecognizedSets.from_snp(random_sets(model, seed=3))
    return S.make_scorer(method, sets=sets, calibration=_calib(), seed=seed)


@pytest.mark.parametrize("method", S.BLOCK_METHODS)
@pytest.mark.parametrize("density", [0.5, 0.25])
def test_block_scorers_meet_density_and_keep_function_at_full_density(method, density):
    model = tiny_model()
    pruned, plan = S.prune_blocks(model, _scorer(method, model), density=density, block_size=B,
                                  classifier_kept=300)
    assert plan.method == method
    for name, bm in plan.block_masks.items():
        shape = model.get_submodule(name).weight.shape
        assert tuple(bm.shape) == block_grid(shape, B)
        assert int(bm.sum()) == num_blocks_to_keep(density, bm.numel()), name
    if method in ("andc", "andc-shuffled", "andc-magnitude"):
        assert plan.classifier_mask is not None  # the label-set rule, whatever its count
    else:
        assert int(plan.classifier_mask.sum()) == 300
    # the permutation (if any) preserves the function: at density 1 with a dense classifier the
    # pruned model computes what the model computes
    full, fplan = S.prune_blocks(model, _scorer(method, model), density=1.0, block_size=B)
    if method not in ("andc", "andc-shuffled", "andc-magnitude"):
        assert fplan.classifier_mask is None
        x = images()
        torch.testing.assert_close(outputs(full, x), outputs(model, x), rtol=1e-4, atol=1e-4)
    # the original model is untouched
    assert all(isinstance(model.get_submodule(n), nn.Linear) for n in plan.block_masks)


def test_andc_scorer_equals_prune_andc():
    model = tiny_model()
    sets = RecognizedSets.from_snp(random_sets(model, seed=3))
    for kw in (dict(density=0.25), dict(tau=0.3)):
        p1, plan1 = prune_andc(model, sets, block_size=B, **kw)
        p2, plan2 = S.prune_blocks(model, S.AndcScorer(sets), block_size=B, **kw)
        assert plan1.blocks_kept() == plan2.blocks_kept()
        for n in plan1.block_masks:
            assert torch.equal(plan1.block_masks[n], plan2.block_masks[n])
        assert torch.equal(plan1.classifier_mask, plan2.classifier_mask)
        torch.testing.assert_close(outputs(p1, images()), outputs(p2, images()))


def test_andc_shuffled_differs_from_andc_and_is_seeded():
    model = tiny_model()

    def masks(method, seed):
        _, plan = S.prune_blocks(model, _scorer(method, model, seed), density=0.25, block_size=B)
        return torch.cat([m.flatten() for m in plan.block_masks.values()]), plan.classifier_mask

    a, a_cls = masks("andc", 0)
    s0, s0_cls = masks("andc-shuffled", 0)
    s0b, _ = masks("andc-shuffled", 0)
    s1, _ = masks("andc-shuffled", 1)
    assert torch.equal(s0, s0b)
    assert not torch.equal(s0, a) and not torch.equal(s0, s1)
    # shuffling moves label sets across nodes: the classifier keeps as many weights as ANDC's
    assert int(s0_cls.sum()) == int(a_cls.sum()) and not torch.equal(s0_cls, a_cls)
    sets = RecognizedSets.from_snp(random_sets(model, seed=3))
    sh = S.shuffle_label_sets(sets, 0)
    for orig, new in zip(sets.ff, sh.ff):  # same multiset of label sets per group
        assert sorted(map(tuple, orig.int().tolist())) == sorted(map(tuple, new.int().tolist()))


def test_andc_magnitude_weighs_overlap_by_magnitude():
    model = tiny_model()
    sets = RecognizedSets.from_snp(random_sets(model, seed=3))
    sc = S.make_scorer("andc-magnitude", sets=sets)
    _, plan = S.prune_blocks(model, sc, density=0.25, block_size=B)
    _, aplan = S.prune_blocks(model, S.AndcScorer(sets), density=0.25, block_size=B)
    assert plan.permutations.order == aplan.permutations.order          # ANDC's permutations
    assert torch.equal(plan.classifier_mask, aplan.classifier_mask)      # and classifier rule
    assert any(not torch.equal(plan.block_masks[n], aplan.block_masks[n]) for n in plan.block_masks)
    # blocks with no kept connection never outrank blocks with one
    from cctk.prune.andc import layer_label_sets
    from cctk.prune.masks import block_reduce, overlap_scores
    perm_sets = sets.permuted(plan.permutations)
    for n, bm in plan.block_masks.items():
        o, i = layer_label_sets(perm_sets, n, model.head_dim)
        kept = block_reduce(overlap_scores(o, i).double(), B)
        if bool((kept[~bm] > 0).any()):
            assert bool((kept[bm] > 0).all()), n


def test_random_scorer_seeded():
    model = tiny_model()
    m = [S.prune_blocks(model, S.RandomScorer(s), density=0.5, block_size=B)[1].block_masks for s in (0, 0, 1)]
    assert all(torch.equal(m[0][n], m[1][n]) for n in m[0])
    assert any(not torch.equal(m[0][n], m[2][n]) for n in m[0])


def test_wanda_scores_are_weight_times_input_norm():
    model = tiny_model()
    sc = S.WandaScorer(_calib(), permute=False)
    _, plan = S.prune_blocks(model, sc, density=0.5, block_size=B)
    name = "classifier.blocks.1.linear2"
    feats = []
    h = model.get_submodule(name).register_forward_pre_hook(lambda m, i: feats.append(i[0].reshape(-1, i[0].shape[-1])))
    for x in _calib():
        outputs(model, x)
    h.remove()
    norms = torch.cat(feats).double().pow(2).sum(0).sqrt()
    expected = model.get_submodule(name).weight.detach().abs().double() * norms[None, :]
    torch.testing.assert_close(sc.element_scores(model, name).double(), expected, rtol=1e-4, atol=1e-6)
    # wanda is not magnitude: the input norms change some block choice
    _, mplan = S.prune_blocks(model, S.MagnitudeScorer(permute=False), density=0.5, block_size=B)
    assert any(not torch.equal(plan.block_masks[n], mplan.block_masks[n]) for n in plan.block_masks)


def test_bad_input_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="unknown block-pruning method"):
        S.make_scorer("bogus")
    with pytest.raises(ValueError, match="needs the SNP label sets"):
        S.make_scorer("andc")
    with pytest.raises(ValueError, match="calibration"):
        S.make_scorer("wanda")
    with pytest.raises(ValueError, match="no keep rule"):
        S.prune_blocks(model, S.MagnitudeScorer(), tau=0.5, block_size=B)
    with pytest.raises(TypeError):
        S.prune_blocks(model, "magnitude", density=0.5)
    with pytest.raises(ValueError, match="keep_fraction"):
        S.prune_nodes(model, S.make_node_scorer("activation", calibration=_calib()), 0.0)


@pytest.mark.parametrize("method", S.NODE_METHODS)
def test_structured_is_smaller_dense_and_equals_node_masked_model(method):
    model = tiny_model()
    sets = RecognizedSets.from_snp(random_sets(model, seed=3))
    scorer = S.make_node_scorer(method, sets=sets, calibration=_calib())
    small, keep = S.prune_nodes(model, scorer, 0.25)
    H, dh, dff, d = model.num_heads, model.head_dim, model.ff_dim, model.embed_dim
    for b, blk in enumerate(small.blocks):
        assert type(blk.linear1) is nn.Linear and blk.linear1.out_features == dff // 4
        assert blk.self_attn.qkv.out_features == 3 * H * (dh // 4)
        assert blk.self_attn.proj.in_features == H * (dh // 4)
    # the masked model: removed nodes silenced in the full model
    masked = tiny_model()
    with torch.no_grad():
        for b, blk in enumerate(masked.blocks):
            drop = torch.ones(dff, dtype=torch.bool)
            drop[keep["ff_keep"][b]] = False
            blk.linear1.weight[drop] = 0
            blk.linear1.bias[drop] = 0
            blk.linear2.weight[:, drop] = 0
            dd = torch.ones(H * dh, dtype=torch.bool)
            for h in range(H):
                dd[h * dh + keep["head_dims_keep"][b][h]] = False
            rows = torch.cat([dd, dd, dd])
            blk.self_attn.qkv.weight[rows] = 0
            blk.self_attn.proj.weight[:, dd] = 0
    x = images()
    torch.testing.assert_close(outputs(small, x), outputs(masked, x), rtol=1e-4, atol=1e-5)
    if method == "snp":  # nodes recognising nothing go first
        for b in range(model.num_blocks):
            counts = sets.ff[b].sum(1)
            kept_min = counts[keep["ff_keep"][b]].min()
            dropped = torch.ones(dff, dtype=torch.bool)
            dropped[keep["ff_keep"][b]] = False
            assert counts[dropped].max() <= kept_min
