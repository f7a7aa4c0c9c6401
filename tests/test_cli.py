"""The ``cctk`` command: --help everywhere, models, train/resume/eval/demo on digits, bad input
(exit status 2, one clear line, no traceback), and the lazily imported command modules."""
import json
import subprocess
import sys
import types

import pytest

from cctk import cli, models

# CPU everywhere: the tests compare accuracies across runs exactly
SMALL = ["--train-subset", "96", "--test-subset", "48", "--batch-size", "32", "--no-progress",
         "--device", "cpu"]


def run_cli(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------
# help


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in cli.COMMAND_MODULES:
        assert cmd in out


def test_every_command_is_a_module_in_one_registry():
    """One way to add a command: every command, built-in or not, is a module with
    add_arguments(parser) and run(args) registered in cli.COMMAND_MODULES."""
    import importlib

    assert list(cli.COMMAND_MODULES) == ["models", "train", "eval", "demo", "snp", "prune", "study", "export"]
    for name, modname in cli.COMMAND_MODULES.items():
        mod = importlib.import_module(modname)
        assert callable(mod.add_arguments) and callable(mod.run), name
    assert not [n for n in vars(cli) if n.startswith("cmd_") or n == "_BUILTIN"]


@pytest.mark.parametrize("cmd", list(cli.COMMAND_MODULES))
def test_subcommand_help(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([cmd, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: cctk {cmd}")


def test_train_help_has_every_config_field(capsys):
    import dataclasses

    from cctk.train import TrainConfig

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "--preset" in out and "cifar100" in out


def test_no_command_is_a_usage_error(capsys):
    code, _, err = run_cli([], capsys)
    assert code == 2 and "usage: cctk" in err


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "cctk.cli", "--help"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "usage: cctk" in proc.stdout


# ------------------------------------------------------------------------------------------
# models


def test_models_lists_every_model_with_params(capsys):
    code, out, _ = run_cli(["models", "--json"], capsys)
    assert code == 0
    rows = json.loads(out)
    assert [r["name"] for r in rows] == models.list_models()
    row = {r["name"]: r for r in rows}["cct_2_3x1_8"]
    m = models.create_model("cct_2_3x1_8")
    assert row["params"] == sum(p.numel() for p in m.parameters())
    assert (row["layers"], row["heads"], row["dim"]) == (m.num_blocks, m.num_heads, m.embed_dim)
    code, out, _ = run_cli(["models"], capsys)
    assert code == 0 and "cct_7_3x1_32" in out and "params" in out.splitlines()[0]


# ------------------------------------------------------------------------------------------
# train, resume, eval, demo


def test_train_resume_eval(tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, err = run_cli(["train", "--dataset", "digits", "--epochs", "1", "--out",
                              str(out_dir)] + SMALL, capsys)
    assert code == 0, err
    m = json.loads((out_dir / "metrics.json").read_text())
    assert m["epochs"] == 1 and m["model"] == "cct_2_3x1_8" and 0 <= m["test_accuracy"] <= 1
    assert "preset 'digits'" in out
    # continue the same run to 2 epochs: the checkpoint's configuration + --epochs
    code, out, err = run_cli(["train", "--out", str(out_dir), "--resume", "--epochs", "2",
                              "--no-progress", "--device", "cpu"], capsys)
    assert code == 0, err
    m2 = json.loads((out_dir / "metrics.json").read_text())
    assert m2["epochs"] == 2 and m2["resumed_from_epoch"] == 1
    assert m2["config"]["train_subset"] == 96 and m2["history"][0] == m["history"][0]
    # evaluate the checkpoint on the same test subset: same accuracy as the run measured
    code, out, err = run_cli(["eval", "--checkpoint", str(out_dir / "checkpoint.pt"),
                              "--subset", "48", "--device", "cpu",
                              "--out", str(tmp_path / "eval.json")], capsys)
    assert code == 0, err
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["samples"] == 48 and ev["accuracy"] == m2["test_accuracy"]
    assert "accuracy" in out


def test_demo_says_what_it_did(tmp_path, capsys):
    code, out, err = run_cli(["demo", "--out", str(tmp_path), "--epochs", "1", "--device", "cpu",
                              "--finetune-epochs", "1", "--sweep", "0.5", "--train-subset", "256",
                              "--test-subset", "128", "--null-draws", "20"], capsys)
    assert code == 0, err
    assert "What happened" in out and "test images" in out and "%" in out and "ANDC kept" in out
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["dataset"] == "digits" and s["train"]["epochs"] == 1
    assert s["linear_density"] == pytest.approx(0.5)
    assert (tmp_path / "report.html").exists() and (tmp_path / "andc" / "checkpoint.pt").exists()
    m = json.loads((tmp_path / "train" / "metrics.json").read_text())
    assert m["dataset"] == "digits" and m["epochs"] == 1


# ------------------------------------------------------------------------------------------
# bad input: exit status 2, a clear message, no traceback, nothing written


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "cct_99_1x1_1"], "unknown model 'cct_99_1x1_1'"),
    (["train", "--dataset", "mnist-9000"], "unknown dataset 'mnist-9000'"),
    (["train", "--dataset", "cifar10", "--data-dir", "/nonexistent/cctk-data"], "--data-dir"),
    (["train", "--epochs", "0"], "epochs must be >= 1"),
    (["train", "--amp", "fp8"], "amp must be one of"),
    (["train", "--resume", "/nonexistent/cctk/checkpoint.pt"], "checkpoint not found"),
])
def test_train_bad_input(tmp_path, capsys, argv, message):
    out_dir = tmp_path / "out"
    code, _, err = run_cli(argv + ["--out", str(out_dir)], capsys)
    assert code == 2
    assert message in err and err.startswith("cctk train: error:")
    assert "Traceback" not in err
    assert not out_dir.exists()


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--epochs", "many"])
    assert exc.value.code == 2
    assert "invalid int value" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    assert cli.main(["train", "--epochs", "1", "--out", str(out), "--no-verbose"] + SMALL) == 0
    return out / "checkpoint.pt"


@pytest.mark.parametrize("extra, message", [
    (["--img-size", "16"], "cannot take 1x16x16 images"),           # learnable pos-emb: 16 tokens
    (["--dataset", "synthetic"], "cannot take 3x32x32 images"),       # wrong channels
    (["--dataset", "no-such-set"], "unknown dataset"),
    (["--dataset", "fashion-mnist", "--data-dir", "/nonexistent/cctk-data"], "fashion-mnist"),
])
def test_eval_bad_input(trained_checkpoint, capsys, extra, message):
    code, _, err = run_cli(["eval", "--checkpoint", str(trained_checkpoint)] + extra, capsys)
    assert code == 2 and message in err and "Traceback" not in err


def test_eval_missing_and_foreign_checkpoint(tmp_path, capsys):
    code, _, err = run_cli(["eval", "--checkpoint", str(tmp_path / "none.pt")], capsys)
    assert code == 2 and "checkpoint not found" in err
    (tmp_path / "junk.pt").write_text("junk")
    code, _, err = run_cli(["eval", "--checkpoint", str(tmp_path / "junk.pt")], capsys)
    assert code == 2 and "cannot read checkpoint" in err


# ------------------------------------------------------------------------------------------
# lazily imported command modules


def test_command_modules(monkeypatch, capsys):
    good = types.ModuleType("cctk_test_cmd_good")
    good.__doc__ = "a test command\n\nmore words"

    def add_arguments(p):
        p.add_argument("--n", type=int, default=3)

    def run(args):
        print(f"ran with n={args.n}")
        return 0

    good.add_arguments, good.run = add_arguments, run
    monkeypatch.setitem(sys.modules, "cctk_test_cmd_good", good)
    good.__spec__ = types.SimpleNamespace(name="cctk_test_cmd_good")
    monkeypatch.setattr(cli.importlib.util, "find_spec",
                        lambda name: None if name == "cctk_test_cmd_missing" else object())

    def import_module(name):
        if name == "cctk_test_cmd_broken":
            raise ImportError("needs a thing that is not installed")
        return sys.modules[name]

    monkeypatch.setattr(cli.importlib, "import_module", import_module)
    monkeypatch.setattr(cli, "COMMAND_MODULES", {"good": "cctk_test_cmd_good",
                                                 "missing": "cctk_test_cmd_missing",
                                                 "broken": "cctk_test_cmd_broken"})
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "good" in out and "a test command" in out
    assert "missing" not in out
    assert "broken" in out and "unavailable" in out
    code, out, _ = run_cli(["good", "--n", "5"], capsys)
    assert code == 0 and "ran with n=5" in out
    code, _, err = run_cli(["broken"], capsys)
    assert code == 1 and "not installed" in err


def test_real_command_modules_never_break_help(capsys):
    """Whatever state cctk.snp.cli / cctk.prune.cli are in, `cctk --help` works."""
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0


def test_dataset_options_reach_the_dataset_and_eval(tmp_path, capsys):
    out_dir = tmp_path / "syn"
    code, out, err = run_cli(["train", "--dataset", "synthetic", "--model", "cct_2_3x1_8",
                              "--img-size", "8", "--dataset-options", "num_samples=40",
                              "--dataset-options", "num_classes=4", "--dataset-options",
                              "in_channels=1", "--epochs", "1", "--batch-size", "16",
                              "--no-progress", "--device", "cpu", "--out", str(out_dir)], capsys)
    assert code == 0, err
    m = json.loads((out_dir / "metrics.json").read_text())
    assert m["dataset_info"]["num_classes"] == 4 and m["dataset_info"]["train_size"] == 40
    assert m["config"]["dataset_options"] == {"num_samples": 40, "num_classes": 4, "in_channels": 1}
    # eval rebuilds the same synthetic test split from the checkpoint's options
    code, out, err = run_cli(["eval", "--checkpoint", str(out_dir / "checkpoint.pt"),
                              "--device", "cpu"], capsys)
    assert code == 0, err
    assert "synthetic/test (40 images)" in out
    assert f"accuracy {m['test_accuracy']:.4f}" in out
    code, _, err = run_cli(["train", "--dataset", "synthetic", "--dataset-options", "colour=red",
                            "--out", str(tmp_path / "bad")], capsys)
    assert code == 2 and "colour" in err
