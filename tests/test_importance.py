"""cctk.prune.importance and the pruner: every method of the registry prunes to the requested
density, the importances' own rules (seeding, the shuffled-label control, wanda, structured
removal equal to node masking), and the ANDC rule of SCIENCE.md 5 (kept-fraction blocks, node
sets for v, measured token sets) against cctk's first rule."""
import pytest
import torch
import torch.nn as nn

import cctk.prune.importance as I
import cctk.prune.masks as PM
from cctk.prune import prune_andc
from cctk.prune.andc import OLD_RULE, AndcRule, MissingTokenSets, RecognizedSets, shuffle_label_sets
from cctk.prune.convert import relative_linear_density
from cctk.prune.masks import block_grid, num_blocks_to_keep
from cctk.prune.plan import Target, encoder_linear_names
from cctk.prune.pruner import METHODS, PruneSpec, prune_blocks, prune_model, prune_nodes

from test_prune import K, images, outputs, random_sets, tiny_model

B = 16


def _calib():
    return [images(8, seed=5), images(8, seed=6)]


def _sets(model, seed=3):
    return RecognizedSets.from_snp(random_sets(model, seed=seed))


def _importance(method, model, seed=0):
    return METHODS[method].build(AndcRule(), PruneSpec(method, seed=seed), _sets(model), _calib(), "cpu")


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("density", [0.5, 0.25])
def test_every_registered_method_prunes_to_the_requested_density(method, density):
    model = tiny_model()
    kind = METHODS[method].kind
    pruned, plan = prune_model(model, PruneSpec(method, density=density, block_size=B, seed=1), _sets(model),
                               calibration=_calib())
    assert plan.method == method
    if kind == "block":         # every encoder linear keeps round(density * n_blocks) blocks
        assert set(plan.block_masks) == set(encoder_linear_names(model))
        for name, bm in plan.block_masks.items():
            assert tuple(bm.shape) == block_grid(model.get_submodule(name).weight.shape, B)
            assert int(bm.sum()) == num_blocks_to_keep(density, bm.numel()), name
        assert relative_linear_density(model, pruned) == pytest.approx(density)
        assert (plan.rule is not None) == METHODS[method].uses_rule
    elif kind == "node":        # every block keeps round(density * n) FF units and head dims
        for blk, full in zip(pruned.blocks, model.blocks):
            assert blk.linear1.out_features == round(density * full.linear1.out_features)
            assert blk.self_attn.qkv.out_features == round(density * full.self_attn.qkv.out_features)
        assert relative_linear_density(model, pruned) == pytest.approx(density)
    else:                       # the hybrid: nodes, then blocks, to the linear density
        assert relative_linear_density(model, pruned) == pytest.approx(density, abs=0.02)
    # the original model is untouched
    assert all(type(model.get_submodule(n)) is nn.Linear for n in encoder_linear_names(model))


@pytest.mark.parametrize("method", [m for m in METHODS if METHODS[m].kind == "block"])
def test_block_methods_keep_the_function_at_full_density(method):
    """The permutations (if any) preserve the function: at density 1 with a dense classifier
    the pruned model computes what the model computes."""
    model = tiny_model()
    full, plan = prune_model(model, PruneSpec(method, density=1.0, block_size=B, classifier=False), _sets(model),
                             calibration=_calib())
    assert plan.classifier_mask is None
    x = images()
    torch.testing.assert_close(outputs(full, x), outputs(model, x), rtol=1e-4, atol=1e-4)


def test_non_label_methods_keep_as_many_classifier_weights_as_andc():
    model = tiny_model()
    sets = _sets(model)
    _, aplan = prune_model(model, PruneSpec("andc", block_size=B), sets)
    for method in ("magnitude", "wanda", "random"):
        _, plan = prune_model(model, PruneSpec(method, block_size=B), sets, calibration=_calib())
        assert int(plan.classifier_mask.sum()) == int(aplan.classifier_mask.sum()), method


def test_registry_all_and_ablation_variants():
    from cctk.prune.pruner import ALL_METHODS, method_rule
    assert ALL_METHODS == ("andc", "magnitude", "wanda", "random", "andc-shuffled", "structured",
                           "structured-activation")
    new = AndcRule()
    assert method_rule("andc", new) == new and method_rule("magnitude", new) is None
    assert method_rule("andc-old", new) == OLD_RULE
    assert method_rule("andc-old+tokens", new) == AndcRule(block_score="sum", v_sets="head", token_sets="measured")
    assert method_rule("andc-old+kept-fraction", new) == AndcRule(v_sets="head", token_sets="assume-all")
    assert method_rule("andc-old+node-v", new) == AndcRule(block_score="sum", token_sets="assume-all")


# ---------------------------------------------------------------------------------------------
# the rule as SCIENCE.md 5 now says


def test_kept_fraction_ranks_a_block_kept_at_90_percent_above_one_kept_at_60():
    """Block A: the rule keeps 90% of its connections, each of overlap 1; block B: 60%, each of
    overlap 4. The kept fraction keeps A; the summed overlap (the old score) keeps B."""
    g = torch.Generator().manual_seed(0)
    sa, sb = torch.zeros(256, dtype=torch.int64), torch.zeros(256, dtype=torch.int64)
    sa[torch.randperm(256, generator=g)[:230]] = 1    # 230 / 256 = 0.9 kept, overlap 1
    sb[torch.randperm(256, generator=g)[:154]] = 4    # 154 / 256 = 0.6 kept, overlap 4
    s = torch.cat([sa.view(16, 16), sb.view(16, 16)], 1)
    keep = PM.connection_keep(s)
    frac = PM.andc_block_scores(s, keep, 16, "kept-fraction")
    assert frac[0].tolist() == pytest.approx([230 / 256, 154 / 256])
    assert PM.andc_block_mask(s, keep, 16, density=0.5).tolist() == [[True, False]]
    assert PM.andc_block_mask(s, keep, 16, density=0.5, block_score="sum").tolist() == [[False, True]]
    # an L1 tie-break only: equal kept fractions go to the larger block norm
    w = torch.ones(16, 32)
    w[:, 16:] = 2.0
    equal = PM.connection_keep(torch.ones(16, 32, dtype=torch.int64))
    assert PM.andc_block_mask(equal.long(), equal, 16, density=0.5, weight=w).tolist() == [[False, True]]


def _two_head_sets(model):
    """Block 0 of a 2-head model whose two heads both recognise labels (head 0: 0-5, head 1: 6-9);
    the token channels recognise {0, 1} (first half) or {7, 8} (second half); head 0's MHA nodes
    recognise label 0, head 1's label 7."""
    sets = random_sets(model, seed=4)
    d, dh = model.embed_dim, model.head_dim
    heads = torch.zeros(2, K, dtype=torch.bool)
    heads[0, :6] = True
    heads[1, 6:] = True
    sets["b0_heads_recognized"] = heads
    tokens = torch.zeros(d, K, dtype=torch.bool)
    tokens[: d // 2, [0, 1]] = True
    tokens[d // 2:, [7, 8]] = True
    sets["tokens_recognized"] = tokens
    mha = torch.zeros(d, K, dtype=torch.bool)
    mha[:dh, 0] = True
    mha[dh:, 7] = True
    sets["b0_mha_recognized"] = mha
    return RecognizedSets.from_snp(sets)


def _head_blocks(plan, model):
    """{(part, head): kept blocks of block 0's qkv} for part in q, k, v."""
    bm = plan.block_masks["classifier.blocks.0.self_attn.qkv"]
    rows = model.head_dim // B                     # row blocks per head
    out = {}
    for p, part in enumerate("qkv"):
        for h in range(model.num_heads):
            start = (p * model.num_heads + h) * rows
            out[(part, h)] = int(bm[start:start + rows].sum())
    return out


def test_block0_qkv_keeps_blocks_for_both_heads():
    model = tiny_model()
    sets = _two_head_sets(model)
    _, plan = prune_andc(model, sets, block_size=B, density=0.25)
    kept = _head_blocks(plan, model)
    for h in range(2):
        assert kept[("q", h)] > 0 and kept[("k", h)] > 0 and kept[("v", h)] > 0, kept
    # cctk's first rule (token channels assumed to recognise every label, summed overlap): every
    # q, k and v row of head 0 outscores every row of head 1, which keeps nothing
    _, old = prune_andc(model, sets, block_size=B, density=0.25, **OLD_RULE.as_dict())
    kept_old = _head_blocks(old, model)
    assert kept_old[("q", 1)] == kept_old[("k", 1)] == kept_old[("v", 1)] == 0 and kept_old[("q", 0)] > 0
    assert old.tokens_assumed and not plan.tokens_assumed


def test_v_rows_use_their_own_node_sets():
    from cctk.prune.andc import layer_label_sets
    model = tiny_model()
    sets = _two_head_sets(model)
    name = "classifier.blocks.0.self_attn.qkv"
    d = model.embed_dim
    out, inp = layer_label_sets(sets, name, model.head_dim, "node")
    assert torch.equal(out[:d], sets.heads[0].repeat_interleave(model.head_dim, 0))      # q: the head's set
    assert torch.equal(out[2 * d:], sets.mha[0])                                        # v: the node's own
    head_out, _ = layer_label_sets(sets, name, model.head_dim, "head")
    assert torch.equal(head_out[2 * d:], head_out[:d]) and torch.equal(inp, sets.tokens)


def test_snp_results_without_token_sets_are_refused_unless_assumed():
    model = tiny_model()
    arrays = random_sets(model)
    del arrays["tokens_recognized"]
    sets = RecognizedSets.from_snp(arrays)
    assert sets.tokens is None
    with pytest.raises(MissingTokenSets, match="rerun `cctk snp`"):
        prune_andc(model, sets, block_size=B, density=0.25)
    with pytest.raises(MissingTokenSets):
        prune_model(model, PruneSpec("andc-shuffled", block_size=B), sets)
    _, plan = prune_andc(model, sets, block_size=B, density=0.25, token_sets="assume-all")
    assert plan.tokens_assumed
    # methods that read no token set run on such results
    prune_model(model, PruneSpec("magnitude", block_size=B), sets)
    prune_model(model, PruneSpec("structured", density=0.5), sets, calibration=_calib())


# ---------------------------------------------------------------------------------------------
# the importances' own rules


def test_andc_shuffled_differs_from_andc_and_is_seeded():
    model = tiny_model()

    def masks(method, seed):
        _, plan = prune_model(model, PruneSpec(method, density=0.25, block_size=B, seed=seed), _sets(model))
        return torch.cat([m.flatten() for m in plan.block_masks.values()]), plan.classifier_mask

    a, a_cls = masks("andc", 0)
    s0, s0_cls = masks("andc-shuffled", 0)
    s0b, _ = masks("andc-shuffled", 0)
    s1, _ = masks("andc-shuffled", 1)
    assert torch.equal(s0, s0b)
    assert not torch.equal(s0, a) and not torch.equal(s0, s1)
    # shuffling moves label sets across nodes: the classifier keeps as many weights as ANDC's
    assert int(s0_cls.sum()) == int(a_cls.sum()) and not torch.equal(s0_cls, a_cls)
    sets = _sets(model)
    sh = shuffle_label_sets(sets, 0)
    for orig, new in zip(sets.ff + [sets.tokens], sh.ff + [sh.tokens]):  # same multiset of sets per group
        assert sorted(map(tuple, orig.int().tolist())) == sorted(map(tuple, new.int().tolist()))


def test_andc_magnitude_weighs_kept_connections_by_magnitude():
    model = tiny_model()
    sets = _sets(model)
    _, plan = prune_model(model, PruneSpec("andc-magnitude", density=0.25, block_size=B), sets)
    _, aplan = prune_model(model, PruneSpec("andc", density=0.25, block_size=B), sets)
    assert plan.permutations.order == aplan.permutations.order          # ANDC's permutations
    assert torch.equal(plan.classifier_mask, aplan.classifier_mask)      # and classifier rule
    assert any(not torch.equal(plan.block_masks[n], aplan.block_masks[n]) for n in plan.block_masks)
    # blocks with no kept connection never outrank blocks with one
    from cctk.prune.andc import layer_label_sets
    perm_sets = sets.permuted(plan.permutations)
    for n, bm in plan.block_masks.items():
        o, i = layer_label_sets(perm_sets, n, model.head_dim)
        kept = PM.block_reduce(PM.overlap_scores(o, i).double(), B)
        if bool((kept[~bm] > 0).any()):
            assert bool((kept[bm] > 0).all()), n


def test_random_importance_seeded():
    model = tiny_model()
    m = [prune_blocks(model, I.RandomImportance(s), Target(B, 0.5))[1].block_masks for s in (0, 0, 1)]
    assert all(torch.equal(m[0][n], m[1][n]) for n in m[0])
    assert any(not torch.equal(m[0][n], m[2][n]) for n in m[0])


def test_wanda_scores_are_weight_times_input_norm():
    model = tiny_model()
    imp = I.WandaImportance(_calib(), permute=False)
    _, plan = prune_blocks(model, imp, Target(B, 0.5))
    name = "classifier.blocks.1.linear2"
    feats = []
    h = model.get_submodule(name).register_forward_pre_hook(lambda m, i: feats.append(i[0].reshape(-1, i[0].shape[-1])))
    for x in _calib():
        outputs(model, x)
    h.remove()
    norms = torch.cat(feats).double().pow(2).sum(0).sqrt()
    expected = model.get_submodule(name).weight.detach().abs().double() * norms[None, :]
    torch.testing.assert_close(imp.element_scores(model, name, imp.norms(model)).double(), expected,
                               rtol=1e-4, atol=1e-6)
    # wanda is not magnitude: the input norms change some block choice
    _, mplan = prune_blocks(model, I.MagnitudeImportance(permute=False), Target(B, 0.5))
    assert any(not torch.equal(plan.block_masks[n], mplan.block_masks[n]) for n in plan.block_masks)


def test_bad_input_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="method must be one of"):
        PruneSpec("bogus")
    with pytest.raises(ValueError, match="needs the SNP label sets"):
        prune_model(model, PruneSpec("andc"), None)
    with pytest.raises(ValueError, match="calibration"):
        prune_model(model, PruneSpec("structured-activation", density=0.5), None)
    with pytest.raises(ValueError, match="no keep rule"):
        prune_blocks(model, I.MagnitudeImportance(), Target(B, tau=0.5))
    with pytest.raises(TypeError):
        prune_blocks(model, "magnitude", Target(B, 0.5))
    with pytest.raises(ValueError, match="block_score"):
        AndcRule(block_score="mean")
    with pytest.raises(ValueError, match="keep_fraction"):
        prune_nodes(model, I.ActivationNodeImportance(_calib()), 0.0)


@pytest.mark.parametrize("importance", ["snp", "activation"])
def test_structured_is_smaller_dense_and_equals_node_masked_model(importance):
    model = tiny_model()
    sets = _sets(model)
    imp = I.SNPNodeImportance(sets, _calib()) if importance == "snp" else I.ActivationNodeImportance(_calib())
    small, keep = prune_nodes(model, imp, 0.25)
    H, dh, dff = model.num_heads, model.head_dim, model.ff_dim
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
    if importance == "snp":  # nodes recognising nothing go first
        for b in range(model.num_blocks):
            counts = sets.ff[b].sum(1)
            kept_min = counts[keep["ff_keep"][b]].min()
            dropped = torch.ones(dff, dtype=torch.bool)
            dropped[keep["ff_keep"][b]] = False
            assert counts[dropped].max() <= kept_min


def _masks_digest(plan) -> str:
    import hashlib
    h = hashlib.sha256()
    for k in sorted(plan.block_masks):
        h.update(k.encode())
        h.update(plan.block_masks[k].numpy().tobytes())
    h.update(plan.classifier_mask.numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("method,rule_as_option,digest", [
    ("andc", True, "3bd15c02ded1a32d"), ("andc-old", False, "3bd15c02ded1a32d"),
    ("andc-shuffled", True, "cdeb3c101313321e"), ("andc-magnitude", True, "117488950b6fdbf8"),
])
def test_old_rule_reproduces_the_first_studys_decisions(method, rule_as_option, digest):
    """The committed Fashion-MNIST study's seed-0 model and SNP sets, density 0.25, 16-blocks:
    the old rule (as options, or as the andc-old method) gives bit for bit the masks, classifier
    mask and node order the code before issue 18 gave (digests recorded from that code)."""
    import os
    from cctk.checkpoint import load_checkpoint
    root = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "study_fmnist", "seed0")
    model, _ = load_checkpoint(os.path.join(root, "train", "checkpoint.pt"), map_location="cpu")
    spec = PruneSpec(method, density=0.25, block_size=16, rule=OLD_RULE if rule_as_option else AndcRule(),
                     qkv_budget="fused")   # the first study met a fused qkv's density over the layer
    _, plan = prune_model(model, spec, os.path.join(root, "snp"))
    assert plan.permutations.order == "lexicographic" and plan.tokens_assumed
    assert _masks_digest(plan) == digest
