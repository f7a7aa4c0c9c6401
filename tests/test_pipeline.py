"""End to end: run_pipeline on digits with very few epochs and small subsets (about a minute on
2 cores): the files are written, with the schema `cctk demo` promises."""
import json

import pytest
import torch

REQUIRED = ("dense_accuracy", "andc_accuracy", "magnitude_accuracy", "linear_density",
            "classifier_density", "dense_images_per_s", "pruned_images_per_s")


@pytest.mark.slow
def test_run_pipeline_digits_tiny(tmp_path):
    from cctk.prune import load_pruned
    from cctk.experiments import run_pipeline

    out = tmp_path / "demo"
    summary = run_pipeline(str(out), dataset="digits", epochs=2, density=0.5, block_size=16,
                           finetune_epochs=1, sweep=(0.5, 0.25), sweep_finetune_epochs=1,
                           train_subset=256, test_subset=128, snp_readout_epochs=2, null_draws=20,
                           device="cpu", verbose=False)
    for name in ("summary.json", "report.html", "snp/nodes.npz", "snp/snp.json",
                 "andc/checkpoint.pt", "magnitude/checkpoint.pt", "train/checkpoint.pt"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "summary.json").read_text())
    for key in REQUIRED:
        assert key in on_disk and isinstance(on_disk[key], float), key
        assert on_disk[key] == pytest.approx(summary[key])
    for key in ("dense_accuracy", "andc_accuracy", "magnitude_accuracy"):
        assert 0.0 <= on_disk[key] <= 1.0
    assert on_disk["linear_density"] == pytest.approx(0.5, abs=1e-9)
    assert on_disk["magnitude_linear_density"] == on_disk["linear_density"]
    assert 0.0 < on_disk["classifier_density"] <= 1.0
    assert on_disk["magnitude_classifier_density"] == pytest.approx(on_disk["classifier_density"])
    assert on_disk["dense_images_per_s"] > 0 and on_disk["pruned_images_per_s"] > 0
    assert on_disk["pruned_vs_masked_dense_max_abs_diff"] < 1e-4
    sweep = on_disk["sweep"]
    assert {(r["method"], r["target_density"]) for r in sweep} == {
        (m, d) for m in ("andc", "magnitude") for d in (0.5, 0.25)}
    # the report is one self-contained page: images inline, nothing fetched
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 4
    assert "src=\"http" not in page and "<script src" not in page
    assert "Accuracy vs density" in page and "Inference throughput" in page
    # the pruned checkpoint reloads without the dense weights and reproduces the ANDC accuracy's model
    model, ckpt = load_pruned(out / "andc" / "checkpoint.pt")
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
    assert ckpt["metrics"]["test_accuracy"] == pytest.approx(on_disk["andc_accuracy"])
    # the classifier sets recomputed at the SNP threshold equal the SNP pass's final_recognized
    from cctk.prune.andc import final_stream_means, final_stream_sets
    from cctk.experiments import train_split_loader
    from cctk.snp import load_recognized
    from cctk.train import load_checkpoint

    dense, dck = load_checkpoint(str(out / "train" / "checkpoint.pt"))
    means = final_stream_means(dense, train_split_loader(dck["dataset"], None, 256), 10)
    snp_final = torch.as_tensor(load_recognized(str(out / "snp"))["final_recognized"])
    assert torch.equal(final_stream_sets(dense, means, 0.3), snp_final)
    scan = on_disk["classifier_scan"]
    dens = [r["classifier_density"] for r in scan]
    assert dens == sorted(dens, reverse=True)  # a higher threshold keeps fewer weights
    # the demo's SNP directory is what `cctk snp` writes: `cctk prune --snp` takes it for the
    # run's checkpoint (its digest is recorded)
    from cctk.cli import main
    assert main(["prune", "--checkpoint", str(out / "train" / "checkpoint.pt"), "--snp", str(out / "snp"),
                 "--method", "structured", "--density", "0.5", "--finetune-epochs", "0", "--subset", "64",
                 "--out", str(out / "structured"), "--device", "cpu"]) == 0
    assert (out / "structured" / "checkpoint.pt").is_file()
