"""`cctk study` on digits (2 seeds, 1 density, tiny budgets): outputs, statistics, resumability,
bad options, and that shuffling the test labels changes no mask, threshold or weight."""
import csv
import json
import os

import numpy as np
import pytest
import torch

import cctk.data
import cctk.experiments.study as study
from cctk.cli import main
from cctk.prune.convert import relative_linear_density
from cctk.prune.pruner import ALL_METHODS

TINY = ["study", "--dataset", "digits", "--seeds", "2", "--densities", "0.25", "--finetune-epochs", "1",
        "--epochs", "1", "--train-subset", "160", "--test-subset", "80", "--val-size", "40",
        "--readout-epochs", "1", "--bench-rounds", "1", "--bench-batch", "8", "--no-progress"]


def _rows(out):
    with open(os.path.join(out, "results.csv")) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def digits_study(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("study") / "d")
    assert main(TINY + ["--methods", "all", "--out", out]) == 0
    return out


def test_study_writes_results_summary_report(digits_study):
    rows = _rows(digits_study)
    assert len(rows) == 2 * len(ALL_METHODS)
    assert {(r["seed"], r["method"]) for r in rows} == {(str(s), m) for s in (0, 1) for m in ALL_METHODS}
    for r in rows:
        for k in ("accuracy", "accuracy_before_finetune", "images_per_s", "linear_density", "classifier_density",
                  "timed_on"):
            assert r[k] != "", (k, r)
        assert abs(float(r["linear_density"]) - 0.25) < 0.02
        assert (r["connection_keep_fraction"] != "") == (r["method"] in ("andc", "andc-shuffled"))
    s = json.load(open(os.path.join(digits_study, "summary.json")))
    assert {c["method"] for c in s["cells"]} == set(ALL_METHODS)
    assert s["timed_on"] == [rows[0]["timed_on"]] and s["machine"]["cpu"] in rows[0]["timed_on"]
    cell = next(c for c in s["cells"] if c["method"] == "andc")
    acc = [float(r["accuracy"]) for r in rows if r["method"] == "andc"]
    assert cell["n"] == 2 and cell["accuracy_mean"] == pytest.approx(sum(acc) / 2)
    assert cell["ci95"][0] <= cell["accuracy_mean"] <= cell["ci95"][1]
    ratios = [float(r["images_per_s"]) / float(r["dense_images_per_s"]) for r in rows if r["method"] == "andc"]
    assert cell["speedup_vs_dense_mean"] == pytest.approx(sum(ratios) / 2)
    primary = [p for p in s["paired"] if p["primary"]]
    assert len(primary) == 1 and primary[0]["method"] == "andc" and primary[0]["baseline"] == "magnitude"
    mag = {r["seed"]: float(r["accuracy"]) for r in rows if r["method"] == "magnitude"}
    andc = {r["seed"]: float(r["accuracy"]) for r in rows if r["method"] == "andc"}
    assert primary[0]["mean_diff"] == pytest.approx(sum(andc[k] - mag[k] for k in mag) / 2)
    assert all("p_holm" in p for p in s["paired"]) and "Holm" in s["multiple_comparisons"]
    for seed in ("0", "1"):
        cls = s["seeds"][seed]["classifier"]
        assert cls["chosen_on"] == "validation" and s["seeds"][seed]["validation"]["start"] == 120
    html = open(os.path.join(digits_study, "report.html")).read()
    assert "designed for" in html and html.index("designed for") < html.index("<table")
    assert "Timed on: " + s["machine"]["cpu"] in html
    md = open(os.path.join(digits_study, "summary.md")).read()
    p0 = primary[0]
    assert f"andc - magnitude at density 0.25: **{100 * p0['mean_diff']:.1f} points" in md
    andc_row = next(ln for ln in md.splitlines() if ln.startswith("| andc |"))
    assert f"{100 * cell['accuracy_mean']:.1f} [{100 * cell['ci95'][0]:.1f}, {100 * cell['ci95'][1]:.1f}] (n=2)" in andc_row


def test_study_resumes_without_redoing_cells(digits_study):
    before = _rows(digits_study)
    assert main(TINY + ["--methods", "andc,magnitude", "--out", digits_study]) == 0
    assert _rows(digits_study) == before  # nothing redone, nothing lost


def test_resumed_study_equals_uninterrupted_one(digits_study, tmp_path):
    """Cells run in another sitting (after a resume) give the same models as in one sitting."""
    out = str(tmp_path / "r")
    one_seed = [a if a != "2" else "0," for a in TINY]  # --seeds "0,": seed 0 only
    assert main(one_seed + ["--methods", "random", "--out", out]) == 0
    assert main(one_seed + ["--methods", "random,magnitude", "--out", out]) == 0
    full = {r["method"]: r for r in _rows(digits_study) if r["seed"] == "0"}
    for r in _rows(out):
        assert r["model_digest"] == full[r["method"]]["model_digest"], r["method"]
        assert r["accuracy"] == full[r["method"]]["accuracy"]


def test_workers_give_the_same_cells_and_time_them_afterwards(digits_study, tmp_path):
    """--workers 2: two processes claim the cells (none run twice, none lost); every cell's model
    equals the one-process study's (same digest: digits runs one thread either way), and images/s
    are filled in afterwards by timing the same structure with the workers gone."""
    out = str(tmp_path / "w")
    one_seed = [a if a != "2" else "0," for a in TINY]
    assert main(one_seed + ["--methods", "random,magnitude,structured", "--workers", "2", "--out", out]) == 0
    rows = _rows(out)
    assert sorted(r["method"] for r in rows) == ["magnitude", "random", "structured"]
    full = {r["method"]: r for r in _rows(digits_study) if r["seed"] == "0"}
    for r in rows:
        assert r["model_digest"] == full[r["method"]]["model_digest"], r["method"]
        assert r["accuracy"] == full[r["method"]]["accuracy"]
        assert r["linear_density"] == full[r["method"]]["linear_density"]
        assert float(r["images_per_s"]) > 0 and float(r["dense_images_per_s"]) > 0
    s = json.load(open(os.path.join(out, "summary.json")))
    assert all(c["images_per_s_mean"] is not None for c in s["cells"])


def test_retime_fills_missing_images_per_s(digits_study, tmp_path):
    """A row without images/s (a worker's, or a study stopped before its timing pass) is timed
    on resume; the accuracies stay as they were."""
    import shutil
    out = str(tmp_path / "t")
    shutil.copytree(digits_study, out)
    rows = _rows(out)
    for r in rows:
        if r["method"] == "wanda":
            r["images_per_s"] = r["dense_images_per_s"] = ""
    study.write_rows(os.path.join(out, "results.csv"), rows)
    # a results.csv written before the timed_on column resumes
    old_fields = [k for k in study.RESULT_FIELDS if k not in ("timed_on", "block_score", "v_sets", "token_sets",
                                                           "finetune_epochs", "timing_other_load")]
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old_fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    # --time-only with a method more: no new cell runs, the missing images/s are filled
    assert main(TINY + ["--methods", ",".join(ALL_METHODS) + ",andc-magnitude",
                        "--time-only", "--out", out]) == 0
    after = _rows(out)
    assert len(after) == len(rows) and "andc-magnitude" not in {r["method"] for r in after}
    for r, a in zip(rows, after):
        assert (a["seed"], a["method"], a["accuracy"], a["model_digest"]) == (r["seed"], r["method"], r["accuracy"], r["model_digest"])
        assert float(a["images_per_s"]) > 0
        assert a["timed_on"] if r["method"] == "wanda" else a["timed_on"] == ""   # old rows: not known


def test_time_only_retimes_rows_timed_under_load_and_retime_all(digits_study, tmp_path):
    """--time-only times again the rows whose timing shared the CPUs with other processes (their
    recorded share above cctk.tune.BUSY_LIMIT) and leaves the others; --retime times every cell
    of the command's methods again. Accuracies never change."""
    import shutil
    out = str(tmp_path / "l")
    shutil.copytree(digits_study, out)
    rows = _rows(out)
    for r in rows:
        r["images_per_s"] = "1.0"   # a sentinel no real timing gives
        r["timing_other_load"] = "0.8" if r["method"] == "random" else "0.0"
    study.write_rows(os.path.join(out, "results.csv"), rows)
    assert main(TINY + ["--methods", "all", "--time-only", "--out", out]) == 0
    after = {(a["seed"], a["method"], a["density"]): a for a in _rows(out)}
    for r in rows:
        a = after[r["seed"], r["method"], r["density"]]
        assert a["accuracy"] == r["accuracy"] and a["model_digest"] == r["model_digest"]
        if r["method"] == "random":
            assert float(a["images_per_s"]) != 1.0 and a["timing_other_load"] != "0.8"
        else:
            assert a["images_per_s"] == "1.0" and a["timing_other_load"] == "0.0"
    assert main(TINY + ["--methods", "magnitude", "--time-only", "--retime", "--out", out]) == 0
    again = _rows(out)
    assert {a["method"] for a in again if a["images_per_s"] == "1.0"} == set(ALL_METHODS) - {"random", "magnitude"}
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["timed_under_load"] == sum(float(a["timing_other_load"] or 0) > 0.25 for a in again)


def test_study_cell_models_rebuilds_cells_and_writes_nothing(digits_study):
    """The models of a finished study, for timing against other runtimes: each cell's pruned
    structure (its linear density as in results.csv; block methods hold ANDCLinear, structured a
    smaller dense model), the trained dense model and a bench batch; the directory is unchanged."""
    from cctk.nn import ANDCLinear
    from cctk.errors import ConfigError
    before = {f: os.path.getmtime(os.path.join(r, f)) for r, _, fs in os.walk(digits_study) for f in fs}
    got = study.study_cell_models(digits_study, 1, ["magnitude", "structured"], 0.25)
    rows = {r["method"]: r for r in _rows(digits_study) if r["seed"] == "1"}
    dense = got["dense"]
    assert got["example"].shape[0] == 8
    assert any(isinstance(m, ANDCLinear) for m in got["pruned"]["magnitude"].modules())
    assert not any(isinstance(m, ANDCLinear) for m in got["pruned"]["structured"].modules())
    for method, m in got["pruned"].items():
        assert not m.training
        assert relative_linear_density(dense, m) == pytest.approx(float(rows[method]["linear_density"]), abs=1e-9)
        assert m(got["example"]).shape == dense(got["example"]).shape
    after = {f: os.path.getmtime(os.path.join(r, f)) for r, _, fs in os.walk(digits_study) for f in fs}
    assert after == before
    with pytest.raises(ConfigError, match="no finished cell"):
        study.study_cell_models(digits_study, 1, ["andc-magnitude"], 0.25)
    with pytest.raises(ConfigError, match="no finished cell"):
        study.study_cell_models(digits_study, 5, ["andc"], 0.25)
    with pytest.raises(ConfigError, match="no study"):
        study.study_cell_models(os.path.join(digits_study, "seed0"), 0, ["andc"], 0.25)


def test_holm_and_paired_statistics():
    adj = study.holm([0.01, 0.04, None, 0.03])
    assert adj == pytest.approx([0.03, 0.06, None, 0.06])
    rows = [{"seed": s, "method": m, "density": 0.5, "accuracy": a, "accuracy_before_finetune": a,
             "images_per_s": 1.0, "linear_density": 0.5}
            for s, (a_m, a_a) in enumerate([(0.80, 0.82), (0.70, 0.73), (0.75, 0.76)])
            for m, a in (("magnitude", a_m), ("andc", a_a))]
    summ = study.summarize_results(rows)
    p = summ["paired"][0]
    # andc is more accurate at the same speed here: the frontier is andc's cell alone
    assert [(c["method"], c["density"]) for c in summ["frontier"]] == [("andc", 0.5)]
    cells = [{"method": m, "density": 0.5, "accuracy_mean": a, "images_per_s_mean": v}
             for m, a, v in (("a", 0.9, 100.0), ("b", 0.8, 200.0), ("c", 0.7, 150.0), ("d", 0.9, 50.0))]
    assert [c["method"] for c in study.pareto_frontier(cells)] == ["b", "a"]
    assert p["mean_diff"] == pytest.approx(0.02)
    from scipy import stats
    assert p["p_value"] == pytest.approx(stats.ttest_rel([0.82, 0.73, 0.76], [0.80, 0.70, 0.75]).pvalue)


def test_summary_lists_dense_accuracy_by_seed_number():
    # seeds.json keeps the order seeds finished in (here 4 before 3); the summary reads by seed
    from cctk.experiments.study.report import study_markdown
    rows = [{"seed": s, "method": m, "density": 0.25, "accuracy": 0.8, "accuracy_before_finetune": 0.5,
             "images_per_s": 1.0, "linear_density": 0.25} for s in range(5) for m in ("magnitude", "andc")]
    summary = study.summarize_results(rows)
    summary["seeds"] = {"0": {"dense_test_accuracy": 0.9}, "1": {"dense_test_accuracy": 0.91},
                        "2": {"dense_test_accuracy": 0.92}, "4": {"dense_test_accuracy": 0.94},
                        "3": {"dense_test_accuracy": 0.93}, "5": {"snp": "no dense accuracy yet"}}
    md = study_markdown(summary)
    assert ("Dense test accuracy per seed: 90.0% (seed 0), 91.0% (seed 1), 92.0% (seed 2), 93.0% (seed 3), "
            "94.0% (seed 4).") in md


@pytest.mark.parametrize("bad, msg", [
    (["--methods", "andc,bogus"], "unknown method"),
    (["--densities", "0.25,1.5"], "densities"),
    (["--seeds", "0"], "seeds"),
    (["--dataset", "nope"], "nope"),
    (["--val-size", "200"], "validation"),
    (["--finetune-subset", "0"], "finetune-subset"),
    (["--device", "bogus"], "device"),
    (["--workers", "0"], "workers"),
    (["--retime"], "--retime goes with --time-only"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent/cctk-data"], "cifar10"),  # missing data
])
def test_bad_options_exit_2_with_one_line(tmp_path, capsys, bad, msg):
    out = str(tmp_path / "o")
    assert main(TINY + bad + ["--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0]
    assert not os.path.exists(os.path.join(out, "results.csv"))


def test_shuffled_test_labels_change_no_mask_threshold_or_weight(tmp_path, monkeypatch):
    def run(out, shuffle):
        real = cctk.data.from_record

        def from_record(record, split, *a, **k):
            ds = real(record, split, *a, **k)
            if split == "eval" and shuffle:
                g = torch.Generator().manual_seed(123)
                base = ds.dataset if hasattr(ds, "dataset") else ds  # a test subset wraps the set
                base.targets = base.targets[torch.randperm(len(base.targets), generator=g)]
            return ds

        monkeypatch.setattr(cctk.data, "from_record", from_record)
        cfg = study.StudyConfig(out=str(out), dataset="digits", seeds=[0], densities=[0.25],
                                methods=["andc", "structured"], finetune_epochs=1, epochs=1,
                                train_subset=160, test_subset=80, val_size=40, readout_epochs=1,
                                bench_rounds=1, bench_batch=8, progress=False, verbose=False,
                                snp_variants=not shuffle)
        s = study.run_study(cfg)
        monkeypatch.setattr(cctk.data, "from_record", real)
        return _rows(out), s

    rows_a, sa = run(tmp_path / "a", False)
    rows_b, sb = run(tmp_path / "b", True)
    assert [r["model_digest"] for r in rows_a] == [r["model_digest"] for r in rows_b]  # masks + weights
    assert sa["seeds"]["0"]["classifier"] == sb["seeds"]["0"]["classifier"]           # threshold, scan
    variants = sa["seeds"]["0"]["snp_variants"]                  # both readouts x 3 thresholds
    assert sorted(variants) == sorted(f"{o}_theta{t}" for o in ("adam", "sgd") for t in (0.2, 0.3, 0.5))
    sgd = json.load(open(tmp_path / "a" / "seed0" / "snp_variants" / "sgd_theta0.3" / "snp.json"))
    assert sgd["config"]["readout"]["bias"] is False and sgd["config"]["split"] == "validation"
    for v in variants.values():
        assert {"mean_cluster_size", "mean_noise", "snr"} <= set(v["blocks"][0]["ff"])
    md = open(tmp_path / "a" / "summary.md").read()             # the variants table, one row per block x group
    snr = variants["sgd_theta0.3"]["blocks"][1]["ff"]["snr"]
    assert f"| sgd | 0.3 | 1 | ff |" in md and f"{snr:.2f} [{snr:.2f}, {snr:.2f}] |" in md
    na, nb = np.load(tmp_path / "a" / "seed0" / "snp" / "nodes.npz"), np.load(tmp_path / "b" / "seed0" / "snp" / "nodes.npz")
    assert all(np.array_equal(na[k], nb[k]) for k in na.files if k.endswith("_recognized"))  # label sets
    # ... and the test labels were really shuffled: the reported accuracies move
    assert [r["accuracy"] for r in rows_a] != [r["accuracy"] for r in rows_b]


def test_dense_classifier_control(tmp_path):
    """--dense-classifier: no classifier ANDC for any method (the control for structured removal,
    which keeps the classifier dense)."""
    out = str(tmp_path / "dc")
    assert main(TINY + ["--seeds", "1", "--methods", "andc,magnitude", "--dense-classifier", "--out", out]) == 0
    rows = _rows(out)
    assert {r["method"] for r in rows} == {"andc", "magnitude"}
    assert all(float(r["classifier_density"]) == 1.0 for r in rows)
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["seeds"]["0"]["classifier"]["threshold"] is None


def test_cell_order_puts_the_primary_comparison_first():
    cfg = study.StudyConfig(out="unused", seeds=(0, 1, 2), densities=(0.5, 0.25, 0.125),
                            methods=("random", "andc", "wanda", "magnitude"))
    cells = [study.cell_key(s, m, d) for s in cfg.seeds for m in cfg.methods for d in cfg.densities]
    order = study.cell_order(cfg, cells)
    assert sorted(order) == sorted(cells)                        # a permutation: nothing lost or added
    # the primary pair at 0.25 for every seed, method by method, then the rest of 0.25, then 0.5, 0.125
    assert order[:6] == [(s, m, 0.25) for m in ("andc", "magnitude") for s in (0, 1, 2)]
    assert order[6:12] == [(s, m, 0.25) for m in ("random", "wanda") for s in (0, 1, 2)]
    assert [c[2] for c in order[12:]] == [0.5] * 12 + [0.125] * 12
    assert order[12:15] == [(s, "random", 0.5) for s in (0, 1, 2)]
    # without the primary density: density by density, in the order given
    cfg2 = study.StudyConfig(out="unused", seeds=(0,), densities=(0.125, 0.5), methods=("magnitude", "andc"))
    cells2 = [study.cell_key(0, m, d) for m in cfg2.methods for d in cfg2.densities]
    assert study.cell_order(cfg2, cells2) == [(0, "magnitude", 0.125), (0, "andc", 0.125),
                                              (0, "magnitude", 0.5), (0, "andc", 0.5)]


# ---------------------------------------------------------------------------------------------
# issue 18: the rule recorded, old studies resume, models reused, the sign-flip test


def test_sign_flip_test_is_exact_and_bounded_by_two_over_two_to_the_n():
    # all three differences positive: only the observed signs and their mirror reach |mean|
    assert study.sign_flip_p([0.01, 0.02, 0.03]) == pytest.approx(2 / 8)
    assert study.sign_flip_p([0.01] * 5) == pytest.approx(2 / 32)
    # by hand: diffs (3, -1, 2); the 8 signed sums: 4, 0, 6, 2, -2, -6, 0, -4 -> |s| >= 4: 4 of 8
    assert study.sign_flip_p([3.0, -1.0, 2.0]) == pytest.approx(4 / 8)
    assert study.sign_flip_p([0.0, 0.0]) == 1.0 and study.sign_flip_p([]) is None
    rows = [{"seed": s, "method": m, "density": 0.25, "accuracy": a, "accuracy_before_finetune": a,
             "images_per_s": "", "linear_density": 0.25}
            for s, (a_m, a_a) in enumerate([(0.80, 0.82), (0.70, 0.73), (0.75, 0.76)])
            for m, a in (("magnitude", a_m), ("andc", a_a))]
    primary = study.summarize_results(rows)["paired"][0]
    assert primary["primary"] and primary["p_sign_flip"] == pytest.approx(0.25)


def test_committed_first_study_still_loads_with_the_old_rule():
    """docs/study_fmnist (written before the rule was recorded) reads as cctk's first rule, and
    its rows still give the committed primary figure."""
    root = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "study_fmnist")
    cfg = study.load_config(root)
    assert (cfg.block_score, cfg.v_sets, cfg.token_sets, cfg.models_from) == ("sum", "head", "assume-all", None)
    rows = study.read_rows(os.path.join(root, "results.csv"))
    for r in rows:
        expect = ("sum", "head", "assume-all") if r["method"].startswith("andc") or r["method"] == "structured-andc" \
            else ("", "", "")
        assert (r["block_score"], r["v_sets"], r["token_sets"]) == expect, r["method"]
    committed = json.load(open(os.path.join(root, "summary.json")))
    old = next(p for p in committed["paired"] if p["primary"])
    new = next(p for p in study.summarize_results(rows)["paired"] if p["primary"])
    assert new["mean_diff"] == pytest.approx(old["mean_diff"]) and new["ci95"] == pytest.approx(old["ci95"])
    assert new["p_sign_flip"] == pytest.approx(2 / 8)   # 3 seeds, every one below magnitude


def test_old_results_csv_and_config_resume_with_the_old_rule(digits_study, tmp_path, capsys):
    """A study directory written before issue 18 (no rule in study_config.json, no rule columns
    in results.csv) resumes with the old rule's options, and is refused with the new defaults
    (its cells would mix two rules)."""
    import shutil
    out = str(tmp_path / "old")
    shutil.copytree(digits_study, out)
    rows = _rows(out)
    old_fields = study.RESULT_FIELDS[:study.RESULT_FIELDS.index("timed_on") + 1]
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old_fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    cfg_path = os.path.join(out, "study_config.json")
    cfg = json.load(open(cfg_path))
    for k in ("block_score", "v_sets", "token_sets", "models_from", "qkv_budget"):
        del cfg[k]
    json.dump(cfg, open(cfg_path, "w"))
    assert main(TINY + ["--methods", "all", "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    for said in ("block_score: 'sum' there, 'kept-fraction' now", "v_sets: 'head' there, 'node' now",
                 "token_sets: 'assume-all' there, 'measured' now", "qkv_budget: 'fused' there, 'split' now"):
        assert said in err[0], err[0]
    old_rule = ["--block-score", "sum", "--v-sets", "head", "--token-sets", "assume-all", "--qkv-budget", "fused"]
    assert main(TINY + ["--methods", "all", "--out", out] + old_rule) == 0
    after = _rows(out)
    assert [(r["seed"], r["method"], r["model_digest"]) for r in after] == \
           [(r["seed"], r["method"], r["model_digest"]) for r in rows]      # nothing redone
    by = {r["method"]: r for r in study.read_rows(os.path.join(out, "results.csv"))}   # the old file, read
    assert (by["andc"]["block_score"], by["andc"]["v_sets"], by["andc"]["token_sets"]) == ("sum", "head", "assume-all")
    assert by["magnitude"]["block_score"] == ""


def test_models_from_reuses_trained_models_and_runs_the_ablation(digits_study, tmp_path):
    """--models-from: the other study's trained models, SNP measured here (token sets included),
    the new rule and the old one with each fix alone in one run, each row recording its rule."""
    out = str(tmp_path / "abl")
    methods = "andc,magnitude,andc-old,andc-old+tokens,andc-old+kept-fraction,andc-old+node-v"
    one_seed = [a if a != "2" else "0," for a in TINY]
    assert main(one_seed + ["--methods", methods, "--dense-classifier", "--models-from", digits_study,
                            "--compare-with", digits_study, "--out", out]) == 0
    assert not os.path.exists(os.path.join(out, "seed0", "train"))                 # nothing retrained
    assert "tokens_recognized" in np.load(os.path.join(out, "seed0", "snp", "nodes.npz")).files
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["seeds"]["0"]["model_source"].startswith("models_from")
    first = json.load(open(os.path.join(digits_study, "summary.json")))
    assert s["seeds"]["0"]["dense_test_accuracy"] == first["seeds"]["0"]["dense_test_accuracy"]   # same model
    rules = {r["method"]: (r["block_score"], r["v_sets"], r["token_sets"]) for r in _rows(out)}
    assert rules == {"andc": ("kept-fraction", "node", "measured"), "magnitude": ("", "", ""),
                     "andc-old": ("sum", "head", "assume-all"), "andc-old+tokens": ("sum", "head", "measured"),
                     "andc-old+kept-fraction": ("kept-fraction", "head", "assume-all"),
                     "andc-old+node-v": ("sum", "node", "assume-all")}
    assert all(float(r["classifier_density"]) == 1.0 for r in _rows(out))
    pairs = {(p["method"], p["baseline"]) for p in s["paired"]}
    assert ("andc", "magnitude") in pairs and ("andc-old+tokens", "andc-old") in pairs
    assert s["rule"]["label-set methods"]["block_score"] == "kept-fraction"
    md = open(os.path.join(out, "summary.md")).read()
    assert "Minus andc-old, paired by seed" in md and "sign-flip" in md
    # --compare-with: each paired difference here minus the same one in the other study, by seed
    between = {(c["method"], c["baseline"]): c for c in s["between_studies"]["comparisons"]}
    here = {r["method"]: float(r["accuracy"]) for r in _rows(out)}
    there = {r["method"]: float(r["accuracy"]) for r in _rows(digits_study) if r["seed"] == "0"}
    gap = (here["andc"] - here["magnitude"]) - (there["andc"] - there["magnitude"])
    assert between[("andc", "magnitude")]["seeds"] == [0] and between[("andc", "magnitude")]["mean_diff"] == pytest.approx(gap)
    assert ("andc-old", "magnitude") not in between                     # not in the other study
    assert "against " + digits_study + " (" in md                       # the path as the user gave it
    # a models-from study trained another way is refused
    assert main(one_seed + ["--epochs", "2", "--methods", "andc", "--models-from", digits_study,
                            "--out", str(tmp_path / "other")]) == 2


def test_anatomy_finds_a_starved_head_dead_inputs_and_the_kept_weight():
    from cctk.experiments.study.anatomy import anatomy_markdown, model_anatomy
    from cctk.models import create_model
    from cctk.nn import MaskedLinear
    torch.manual_seed(0)
    dense = create_model("cct_2_3x1_8", num_classes=10).eval()
    pruned = create_model("cct_2_3x1_8", num_classes=10).eval()
    pruned.load_state_dict(dense.state_dict())
    attn = pruned.blocks[0].self_attn
    qkv = attn.qkv
    H, dim = attn.num_heads, qkv.in_features
    dh = dim // H
    mask = torch.ones(qkv.out_features, dim, dtype=torch.bool)
    mask[dh:2 * dh] = False          # q rows of head 1: nothing kept
    mask[:, :3] = False              # the first 3 input columns feed nothing
    attn.qkv = MaskedLinear.from_linear(qkv, mask=mask)
    a = model_anatomy(dense, pruned)
    rec = a["classifier.blocks.0.self_attn.qkv"]
    assert rec["heads_without"] == {"q": [1], "k": [], "v": []}
    assert rec["kept_per_head"]["q"][1] == 0 and rec["kept_per_head"]["k"][1] == dh * (dim - 3)
    assert rec["dead_inputs"] == pytest.approx(3 / dim) and rec["dead_outputs"] == pytest.approx(dh / (3 * dim))
    w = dense.blocks[0].self_attn.qkv.weight.detach().abs()
    assert rec["kept_weight"] == pytest.approx(float((w * mask).sum() / w.sum()), rel=1e-5)
    assert list(a) == ["classifier.blocks.0.self_attn.qkv"]     # the dense layers are not reported
    md = anatomy_markdown({"density": 0.5, "methods": ["andc"], "seeds": {"0": {"andc": a}}})
    assert "**0**" in md


def test_anatomy_cli_on_a_finished_study(digits_study, tmp_path, capsys):
    import shutil
    out = str(tmp_path / "a")
    shutil.copytree(digits_study, out)
    before = open(os.path.join(out, "results.csv")).read()
    assert main(TINY + ["--methods", "all", "--anatomy", "--out", out]) == 0
    assert open(os.path.join(out, "results.csv")).read() == before     # no cell ran
    res = json.load(open(os.path.join(out, "anatomy.json")))["0.25"]
    from cctk.prune.pruner import METHODS
    block_methods = [m for m in ALL_METHODS if METHODS[m].kind == "block"]
    assert res["methods"] == block_methods and sorted(res["seeds"]) == ["0", "1"]
    for per in res["seeds"].values():
        for layers in per.values():
            assert layers and all(0 <= v["kept_weight"] <= 1 and 0 <= v["dead_inputs"] <= 1 for v in layers.values())
    assert "q " in open(os.path.join(out, "anatomy.md")).read()
    assert main(TINY + ["--methods", "all", "--anatomy", "--time-only", "--out", out]) == 2


def test_seeds_info_of_processes_sharing_an_out_dir_merges(tmp_path):
    """Two processes on one study each prepare their own seeds: seeds.json ends with both, and a
    seed's later entry (SNP variants) keeps what was there (it is re-read under the results lock,
    not written from a process's stale view)."""
    from cctk.experiments.study.ledger import merge_seed_info, read_seeds_info
    out = str(tmp_path)
    assert read_seeds_info(out) == {}
    merge_seed_info(out, 0, {"dense_test_accuracy": 0.91, "snp_dir": "a"})   # process 1
    merge_seed_info(out, 3, {"dense_test_accuracy": 0.92, "snp_dir": "b"})   # process 2
    merge_seed_info(out, 0, {"snp_variants": {"k": 1}})
    info = json.load(open(os.path.join(out, "seeds.json")))
    assert info == {"0": {"dense_test_accuracy": 0.91, "snp_dir": "a", "snp_variants": {"k": 1}},
                    "3": {"dense_test_accuracy": 0.92, "snp_dir": "b"}}
