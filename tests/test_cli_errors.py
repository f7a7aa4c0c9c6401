"""Every later command sees the splits a run trained and tested on (``cctk.data.from_record``),
and every user error of the ``cctk`` command is one line on stderr with exit status 2: no
traceback, nothing written, nothing lost (read-only and full file systems included, on small
tmpfs mounts where this machine lets the test mount one)."""
import contextlib
import json
import os
import subprocess
import types

import numpy as np
import pytest
import torch

from cctk import cli, data
from cctk.experiments import train_split_loader
from cctk.prune.workflow import data_loaders

FAST = ["--no-progress", "--device", "cpu", "--batch-size", "64"]
SNP_FAST = ["--device", "cpu", "--readout-epochs", "1", "--null-draws", "0", "--no-plots"]


def run_ok(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def run_error(argv, capsys):
    """The command fails as a user error: exit 2, one ``cctk <cmd>: error:`` line, no traceback
    (argparse's own errors included)."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2, (code, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = [s for s in err.splitlines() if s.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"cctk {argv[0]}: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One digits run with a NON-default split (test_fraction=0.3), its SNP and its ANDC pruning."""
    root = tmp_path_factory.mktemp("run")
    r = types.SimpleNamespace(root=root, train=root / "train", snp=root / "snp", pruned=root / "andc")
    assert cli.main(["train", "--dataset", "digits", "--dataset-options", "test_fraction=0.3",
                     "--epochs", "1", "--out", str(r.train), "--no-verbose"] + FAST) == 0
    r.ckpt = r.train / "checkpoint.pt"
    assert cli.main(["snp", "--checkpoint", str(r.ckpt), "--out", str(r.snp)] + SNP_FAST) == 0
    assert cli.main(["prune", "--checkpoint", str(r.ckpt), "--snp", str(r.snp), "--density", "0.5",
                     "--block-size", "16", "--finetune-epochs", "0", "--device", "cpu",
                     "--out", str(r.pruned)]) == 0
    r.pruned_ckpt = r.pruned / "checkpoint.pt"
    return r


# ---------------------------------------------------------------------------------------------
# the split test


def test_every_command_sees_the_runs_splits(run, capsys):
    capsys.readouterr()
    train_set = data.get_dataset("digits", "train", test_fraction=0.3)
    test_set = data.get_dataset("digits", "test", test_fraction=0.3)
    default_test = data.get_dataset("digits", "test")
    assert len(test_set) != len(default_test)          # the option matters
    m = json.loads((run.train / "metrics.json").read_text())
    assert (m["dataset_info"]["train_size"], m["dataset_info"]["test_size"]) == (len(train_set), len(test_set))
    # eval
    out = run_ok(["eval", "--checkpoint", str(run.ckpt), "--device", "cpu"], capsys)
    assert f"digits/test ({len(test_set)} images)" in out
    assert f"accuracy {m['test_accuracy']:.4f}" in out
    # snp: the analysed (test) split and the recorded options
    snp = json.loads((run.snp / "snp.json").read_text())
    assert snp["num_samples"] == len(test_set)
    assert snp["config"]["dataset_options"] == {"test_fraction": 0.3}
    # prune: fine-tuned on the run's training split, accuracies on its evaluation split
    rec = json.loads((run.pruned / "prune.json").read_text())
    assert rec["data"] == {"train_samples": len(train_set), "eval_samples": len(test_set),
                           "eval_split": "test", "dataset_options": {"test_fraction": 0.3}}
    # the experiments' loaders and from_record itself: the very same images and labels
    record = torch.load(run.ckpt, weights_only=True)["dataset"]
    tl, el, _ = data_loaders(record)
    assert list(el.dataset.targets) == list(test_set.targets)
    assert list(tl.dataset.targets) == list(train_set.targets)
    assert list(train_split_loader(record, None, None).dataset.targets) == list(train_set.targets)
    assert torch.equal(data.from_record(record, "eval")[0][0], test_set[0][0])


def test_flowers_record_evaluates_on_val():
    rec = {"name": "flowers102", "eval_split": "val", "data_dir": "/nonexistent/cctk-data"}
    with pytest.raises(data.DataError, match="val|flowers"):
        data.from_record(rec, "eval")
    with pytest.raises(data.DatasetArgumentError, match="names no dataset"):
        data.from_record({}, "train")


# ---------------------------------------------------------------------------------------------
# bad input: exit 2, one line, nothing written


def _crafted(path, marker):
    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    torch.save({"format": "cctk-checkpoint", "state_dict": {}, "x": Payload()}, path)


@pytest.fixture
def bad(run, tmp_path):
    """Paths of broken inputs beside the good ones of ``run``."""
    b = types.SimpleNamespace(**vars(run), tmp=tmp_path, out=tmp_path / "out")
    b.file = tmp_path / "a_file"
    b.file.write_text("keep me")
    b.empty = tmp_path / "empty.pt"
    b.empty.write_bytes(b"")
    b.junk = tmp_path / "junk.pt"
    b.junk.write_text("101")
    b.foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.ones(2)}, b.foreign)
    ck = torch.load(run.ckpt, weights_only=True)
    no_sd = dict(ck)
    no_sd.pop("state_dict")
    b.no_state = tmp_path / "no_state.pt"
    torch.save(no_sd, b.no_state)
    shape = dict(ck, state_dict={k: torch.zeros(2, *v.shape) if v.dim() else v
                                 for k, v in ck["state_dict"].items()})
    b.other_shape = tmp_path / "other_shape.pt"
    torch.save(shape, b.other_shape)
    b.marker = tmp_path / "pwned"
    b.crafted = tmp_path / "crafted.pt"
    _crafted(b.crafted, b.marker)
    # a corrupt nodes.npz beside a valid snp.json (same checkpoint)
    b.corrupt_snp = tmp_path / "corrupt_snp"
    b.corrupt_snp.mkdir()
    (b.corrupt_snp / "snp.json").write_bytes((run.snp / "snp.json").read_bytes())
    (b.corrupt_snp / "nodes.npz").write_bytes(b"PK\x03\x04 not a zip")
    # an SNP directory of another checkpoint (same model, other weights)
    other = dict(ck, state_dict={k: v + 1 if v.is_floating_point() else v for k, v in ck["state_dict"].items()})
    b.other_ckpt = tmp_path / "other.pt"
    torch.save(other, b.other_ckpt)
    b.no_json_snp = tmp_path / "no_json_snp"
    b.no_json_snp.mkdir()
    (b.no_json_snp / "nodes.npz").write_bytes((run.snp / "nodes.npz").read_bytes())
    # snp.json beside a nodes.npz of another checkpoint, or of an older cctk (no digest)
    with np.load(run.snp / "nodes.npz") as z:
        arrays = {k: z[k] for k in z.files}
    for name, digest in (("foreign_npz_snp", "0" * 64), ("undigested_npz_snp", None)):
        d = tmp_path / name
        d.mkdir()
        (d / "snp.json").write_bytes((run.snp / "snp.json").read_bytes())
        extra = {} if digest is None else {"checkpoint_sha256": np.array(digest)}
        np.savez(d / "nodes.npz", **{k: v for k, v in arrays.items() if k != "checkpoint_sha256"}, **extra)
        setattr(b, name, d)
    # snp.json whose config is a list, or whose model_config is a string
    summary = json.loads((run.snp / "snp.json").read_text())
    for name, edit in (("list_config_snp", lambda j: dict(j, config=[1, 2])),
                       ("str_model_config_snp", lambda j: dict(j, config=dict(j["config"], model_config="cct")))):
        d = tmp_path / name
        d.mkdir()
        (d / "snp.json").write_text(json.dumps(edit(summary)))
        (d / "nodes.npz").write_bytes((run.snp / "nodes.npz").read_bytes())
        setattr(b, name, d)
    # non-finite weights; a pruned checkpoint without its block masks
    nan = dict(ck, state_dict=dict(ck["state_dict"]))
    first = next(k for k, v in nan["state_dict"].items() if v.is_floating_point())
    nan["state_dict"][first] = torch.full_like(nan["state_dict"][first], float("nan"))
    b.nan = tmp_path / "nan.pt"
    torch.save(nan, b.nan)
    pk = torch.load(run.pruned_ckpt, weights_only=True)
    pk["pruning"] = {k: v for k, v in pk["pruning"].items() if k != "block_masks"}
    b.no_masks = tmp_path / "no_masks.pt"
    torch.save(pk, b.no_masks)
    b.eval_report = tmp_path / "report.json"
    b.users_onnx = tmp_path / "users"
    b.users_onnx.mkdir()
    (b.users_onnx / "model.onnx").write_text("the user's own model")
    return b


NO_GPU = not torch.cuda.is_available()
CASES = [
    # train
    ("train --out is a file", lambda b: ["train", "--out", b.file, "--epochs", "1"], "is a file"),
    ("train --batch-size 0", lambda b: ["train", "--out", b.out, "--batch-size", "0"], "batch_size must be >= 1"),
    ("train --train-subset 0", lambda b: ["train", "--out", b.out, "--train-subset", "0"], "train_subset"),
    ("train --device nonsense", lambda b: ["train", "--out", b.out, "--device", "gpu7"], "not a device"),
    ("train over a finished run", lambda b: ["train", "--out", b.train, "--epochs", "1"], "already holds a run"),
    ("train --resume from a pruned checkpoint",
     lambda b: ["train", "--out", b.out, "--resume", b.pruned_ckpt], "pruned checkpoint"),
    ("train --resume an empty file", lambda b: ["train", "--out", b.out, "--resume", b.empty], "cannot read"),
    ("train --resume a crafted file", lambda b: ["train", "--out", b.out, "--resume", b.crafted], "cannot read"),
    ("train --resume a foreign file", lambda b: ["train", "--out", b.out, "--resume", b.foreign],
     "not a cctk checkpoint"),
    # eval
    ("eval --subset 0", lambda b: ["eval", "--checkpoint", b.ckpt, "--subset", "0"], "--subset must be >= 1"),
    ("eval --batch-size 0", lambda b: ["eval", "--checkpoint", b.ckpt, "--batch-size", "0"], "--batch-size"),
    ("eval --num-workers -1", lambda b: ["eval", "--checkpoint", b.ckpt, "--num-workers", "-1"], "--num-workers"),
    ("eval --out is a directory", lambda b: ["eval", "--checkpoint", b.ckpt, "--out", b.tmp], "is a directory"),
    ("eval an empty file", lambda b: ["eval", "--checkpoint", b.empty], "cannot read checkpoint"),
    ("eval a text file", lambda b: ["eval", "--checkpoint", b.junk], "cannot read checkpoint"),
    ("eval a foreign torch file", lambda b: ["eval", "--checkpoint", b.foreign], "not a cctk checkpoint"),
    ("eval a checkpoint without a state dict", lambda b: ["eval", "--checkpoint", b.no_state], "no model weights"),
    ("eval a checkpoint of another shape", lambda b: ["eval", "--checkpoint", b.other_shape], "do not fit"),
    ("eval a crafted pickle", lambda b: ["eval", "--checkpoint", b.crafted], "cannot read checkpoint"),
    ("eval --split nosuch", lambda b: ["eval", "--checkpoint", b.ckpt, "--split", "nosuch"], "no split 'nosuch'"),
    # snp
    ("snp --out is a file", lambda b: ["snp", "--checkpoint", b.ckpt, "--out", b.file], "is a file"),
    ("snp --batch-size 0", lambda b: ["snp", "--checkpoint", b.ckpt, "--out", b.out, "--batch-size", "0"], "--batch-size"),
    ("snp --subset 0", lambda b: ["snp", "--checkpoint", b.ckpt, "--out", b.out, "--subset", "0"], "--subset"),
    ("snp --threshold 1.5", lambda b: ["snp", "--checkpoint", b.ckpt, "--out", b.out, "--threshold", "1.5"], "--threshold"),
    ("snp of a pruned checkpoint", lambda b: ["snp", "--checkpoint", b.pruned_ckpt, "--out", b.out], "pruned"),
    ("snp of a missing checkpoint", lambda b: ["snp", "--checkpoint", b.tmp / "none.pt", "--out", b.out], "not found"),
    ("snp of a crafted pickle", lambda b: ["snp", "--checkpoint", b.crafted, "--out", b.out], "cannot read"),
    # prune
    ("prune an already-pruned checkpoint",
     lambda b: ["prune", "--checkpoint", b.pruned_ckpt, "--snp", b.snp, "--out", b.out], "already pruned"),
    ("prune with a corrupt nodes.npz",
     lambda b: ["prune", "--checkpoint", b.ckpt, "--snp", b.corrupt_snp, "--out", b.out], "nodes.npz"),
    ("prune with the SNP of another checkpoint",
     lambda b: ["prune", "--checkpoint", b.other_ckpt, "--snp", b.snp, "--out", b.out], "another checkpoint"),
    ("prune with an SNP dir without snp.json",
     lambda b: ["prune", "--checkpoint", b.ckpt, "--snp", b.no_json_snp, "--out", b.out], "snp.json"),
    ("prune --finetune-epochs -1",
     lambda b: ["prune", "--checkpoint", b.ckpt, "--snp", b.snp, "--out", b.out, "--finetune-epochs", "-1"],
     "--finetune-epochs"),
    ("prune --batch-size 0",
     lambda b: ["prune", "--checkpoint", b.ckpt, "--snp", b.snp, "--out", b.out, "--batch-size", "0"], "--batch-size"),
    ("prune --subset 0",
     lambda b: ["prune", "--checkpoint", b.ckpt, "--snp", b.snp, "--out", b.out, "--subset", "0"], "--subset"),
    ("prune --density 0", lambda b: ["prune", "--checkpoint", b.ckpt, "--snp", b.snp, "--out", b.out,
                                     "--density", "0"], "--density"),
    ("prune andc without --snp", lambda b: ["prune", "--checkpoint", b.ckpt, "--out", b.out], "needs --snp"),
    ("prune --out is a file", lambda b: ["prune", "--checkpoint", b.ckpt, "--snp", b.snp, "--out", b.file], "is a file"),
    # demo
    ("demo --epochs 0", lambda b: ["demo", "--out", b.out, "--epochs", "0"], "--epochs"),
    ("demo --density 2", lambda b: ["demo", "--out", b.out, "--density", "2"], "--density"),
    ("demo --train-subset 0", lambda b: ["demo", "--out", b.out, "--train-subset", "0"], "--train-subset"),
    ("demo --out is a file", lambda b: ["demo", "--out", b.file], "is a file"),
    # export
    ("export --out is a file", lambda b: ["export", "--checkpoint", b.ckpt, "--format", "onnx", "--out", b.file],
     "is a file"),
    ("export onnx in bfloat16", lambda b: ["export", "--checkpoint", b.ckpt, "--format", "onnx", "--out", b.out,
                                           "--dtype", "bfloat16"], "--format openvino"),
    ("export --batch 0", lambda b: ["export", "--checkpoint", b.ckpt, "--format", "onnx", "--out", b.out,
                                    "--batch", "0"], "'dynamic'"),
    ("export --format tflite", lambda b: ["export", "--checkpoint", b.ckpt, "--format", "tflite", "--out", b.out],
     "invalid choice"),
    ("export a crafted pickle", lambda b: ["export", "--checkpoint", b.crafted, "--format", "onnx", "--out", b.out],
     "cannot read checkpoint"),
    # --- the failure classes of issue 17 ---
    # data loss: no command writes over a file it reads or into another command's run
    ("prune --out the training run", lambda b: ["prune", "--checkpoint", b.ckpt, "--snp", b.snp, "--out", b.train],
     "holds a `cctk train` run"),
    ("prune --out its SNP directory", lambda b: ["prune", "--checkpoint", b.ckpt, "--snp", b.snp, "--out", b.snp],
     "holds a `cctk snp` run"),
    ("eval --out its own checkpoint", lambda b: ["eval", "--checkpoint", b.ckpt, "--out", b.ckpt],
     "is the checkpoint it evaluates"),
    ("eval --out a file that is no eval report", lambda b: ["eval", "--checkpoint", b.ckpt, "--out", b.file],
     "not a report of `cctk eval`"),
    ("eval --out the run's metrics.json", lambda b: ["eval", "--checkpoint", b.ckpt, "--out", b.train / "metrics.json"],
     "not a report of `cctk eval`"),
    ("snp --out the training run", lambda b: ["snp", "--checkpoint", b.ckpt, "--out", b.train], "holds a `cctk train` run"),
    ("train --out an SNP directory", lambda b: ["train", "--out", b.snp, "--epochs", "1"], "holds a `cctk snp` run"),
    ("train --out a pruned run", lambda b: ["train", "--out", b.pruned, "--epochs", "1"], "holds a `cctk prune` run"),
    ("export --out the training run", lambda b: ["export", "--checkpoint", b.ckpt, "--format", "onnx",
                                                 "--out", b.train], "holds a `cctk train` run"),
    ("study --out the training run", lambda b: ["study", "--out", b.train], "holds a `cctk train` run"),
    ("export --out a directory holding the user's own model.onnx",
     lambda b: ["export", "--checkpoint", b.ckpt, "--format", "onnx", "--out", b.users_onnx], "would replace it"),
    ("demo --out the pruned run", lambda b: ["demo", "--out", b.pruned], "holds a `cctk prune` run"),
    # silently wrong: resume changes nothing of what the run is; a pair names one checkpoint;
    # every number in range and finite; non-finite weights refused
    ("train --resume with other data options",
     lambda b: ["train", "--out", b.train, "--resume", "--dataset-options", "test_fraction=0.5"], "dataset_options"),
    ("train --resume with another lr", lambda b: ["train", "--out", b.train, "--resume", "--lr", "0.1"], "lr 0.002 -> 0.1"),
    ("train --resume with another seed", lambda b: ["train", "--out", b.train, "--resume", "--seed", "3"], "seed"),
    ("prune with a nodes.npz of another checkpoint",
     lambda b: ["prune", "--checkpoint", b.ckpt, "--snp", b.foreign_npz_snp, "--out", b.out], "not name the same checkpoint"),
    ("prune with a nodes.npz without digest",
     lambda b: ["prune", "--checkpoint", b.ckpt, "--snp", b.undigested_npz_snp, "--out", b.out],
     "not name the same checkpoint"),
    ("train --warmup-lr -1", lambda b: ["train", "--out", b.out, "--warmup-lr", "-1"], "warmup_lr must be >= 0"),
    ("train --min-lr above --lr", lambda b: ["train", "--out", b.out, "--lr", "1e-3", "--min-lr", "0.1"], "min_lr"),
    ("train --betas 2 2", lambda b: ["train", "--out", b.out, "--betas", "2", "2"], "betas"),
    ("train --drop-path-rate 1.5", lambda b: ["train", "--out", b.out, "--drop-path-rate", "1.5"], "drop_path_rate"),
    ("train --attn-drop-rate -0.1", lambda b: ["train", "--out", b.out, "--attn-drop-rate", "-0.1"], "attn_drop_rate"),
    ("train --lr inf", lambda b: ["train", "--out", b.out, "--lr", "inf"], "--lr must be a finite number"),
    ("train --dataset-options test_fraction=nan",
     lambda b: ["train", "--out", b.out, "--dataset-options", "test_fraction=nan"], "finite"),
    ("snp --readout-lr nan", lambda b: ["snp", "--checkpoint", b.ckpt, "--out", b.out, "--readout-lr", "nan"], "finite"),
    ("prune --lr inf", lambda b: ["prune", "--checkpoint", b.ckpt, "--snp", b.snp, "--out", b.out, "--lr", "inf"],
     "finite"),
    ("prune --tau nan", lambda b: ["prune", "--checkpoint", b.ckpt, "--snp", b.snp, "--out", b.out, "--tau", "nan"],
     "finite"),
    ("study --lr nan", lambda b: ["study", "--out", b.out, "--lr", "nan"], "finite"),
    ("demo --density nan", lambda b: ["demo", "--out", b.out, "--density", "nan"], "finite"),
    ("eval NaN weights", lambda b: ["eval", "--checkpoint", b.nan], "non-finite weights"),
    ("snp NaN weights", lambda b: ["snp", "--checkpoint", b.nan, "--out", b.out], "non-finite weights"),
    ("prune NaN weights", lambda b: ["prune", "--checkpoint", b.nan, "--method", "magnitude", "--out", b.out],
     "non-finite weights"),
    ("train --resume NaN weights", lambda b: ["train", "--out", b.out, "--resume", b.nan], "non-finite weights"),
    ("export NaN weights", lambda b: ["export", "--checkpoint", b.nan, "--format", "onnx", "--out", b.out],
     "non-finite weights"),
    # tracebacks before: validated before anything runs
    ("study --block-size 7", lambda b: ["study", "--out", b.out, "--block-size", "7"], "invalid choice"),
    ("prune with snp.json config a list",
     lambda b: ["prune", "--checkpoint", b.ckpt, "--snp", b.list_config_snp, "--out", b.out], "cannot read its snp.json"),
    ("prune with snp.json model_config a string",
     lambda b: ["prune", "--checkpoint", b.ckpt, "--snp", b.str_model_config_snp, "--out", b.out],
     "cannot read its snp.json"),
    ("train --epochs many", lambda b: ["train", "--out", b.out, "--epochs", "many"], "invalid int value"),
    # unclear before
    ("eval a pruned checkpoint without masks", lambda b: ["eval", "--checkpoint", b.no_masks], "lacks block_masks"),
    ("eval a run directory", lambda b: ["eval", "--checkpoint", b.train], "give the file"),
    ("demo --dataset nosuch", lambda b: ["demo", "--out", b.out, "--dataset", "nosuch"], "unknown dataset"),
    ("study --model nosuch", lambda b: ["study", "--out", b.out, "--model", "nosuch"], "unknown model"),
    ("train --resume another run's checkpoint into a run",
     lambda b: ["train", "--out", b.train, "--resume", b.other_ckpt], "holds another run"),
]
if NO_GPU:
    CASES += [
        ("train --device cuda without a GPU", lambda b: ["train", "--out", b.out, "--device", "cuda"], "CUDA"),
        ("eval --device cuda without a GPU", lambda b: ["eval", "--checkpoint", b.ckpt, "--device", "cuda"], "CUDA"),
        ("snp --device cuda without a GPU",
         lambda b: ["snp", "--checkpoint", b.ckpt, "--out", b.out, "--device", "cuda"], "CUDA"),
        ("snp --backend triton on a CPU",
         lambda b: ["snp", "--checkpoint", b.ckpt, "--out", b.out, "--backend", "triton", "--device", "cpu"],
         "triton"),
        ("demo --device cuda without a GPU", lambda b: ["demo", "--out", b.out, "--device", "cuda"], "CUDA"),
    ]


def _snapshot(root):
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("argv, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(bad, capsys, argv, message):
    before_run, before_tmp = _snapshot(bad.root), _snapshot(bad.tmp)
    line = run_error([str(a) for a in argv(bad)], capsys)
    assert message in line, line
    assert not bad.out.exists()
    assert not bad.marker.exists()                       # no crafted payload ran
    assert _snapshot(bad.root) == before_run and _snapshot(bad.tmp) == before_tmp


def test_two_runs_into_one_out_the_second_is_refused(tmp_path, capsys):
    from cctk.checkpoint import output_dir

    out = tmp_path / "run"
    with output_dir(out):       # another process's run, alive
        line = run_error(["train", "--out", str(out), "--epochs", "1"] + FAST, capsys)
        assert sorted(p.name for p in out.iterdir()) == [".cctk.lock"]
    assert "in use by another cctk process" in line
    assert not out.exists()     # the lock holder created the directory, wrote nothing: both gone


def test_overwrite_replaces_a_finished_run(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--dataset", "digits", "--epochs", "1", "--train-subset", "64", "--test-subset",
            "32", "--out", str(out), "--no-verbose"] + FAST
    run_ok(args, capsys)
    first = (out / "metrics.json").read_bytes()
    run_error(args, capsys)
    assert (out / "metrics.json").read_bytes() == first
    run_ok(args + ["--overwrite", "--seed", "1"], capsys)
    assert json.loads((out / "metrics.json").read_text())["config"]["seed"] == 1


# ---------------------------------------------------------------------------------------------
# read-only and full file systems (small tmpfs mounts)


@contextlib.contextmanager
def tmpfs(path, size="64k", read_only=False):
    path.mkdir()
    opts = f"size={size}" + (",ro" if read_only else "")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): "
                    f"{res.stderr.decode().strip()[:100]}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(mount):
    fd = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)


def test_read_only_file_system(run, tmp_path, capsys):
    with tmpfs(tmp_path / "ro", read_only=True) as ro:
        line = run_error(["eval", "--checkpoint", str(run.ckpt), "--device", "cpu",
                          "--out", str(ro / "eval.json")], capsys)
        assert "Read-only file system" in line
        line = run_error(["snp", "--checkpoint", str(run.ckpt), "--out", str(ro / "snp")] + SNP_FAST, capsys)
        assert "Read-only file system" in line
        line = run_error(["train", "--out", str(ro / "run"), "--epochs", "1"] + FAST, capsys)
        assert "Read-only file system" in line
        assert os.listdir(ro) == []


def test_full_file_system_keeps_the_old_results(run, tmp_path, capsys):
    with tmpfs(tmp_path / "full", size="2m") as full:
        snp = full / "snp"
        snp.mkdir()
        for name in ("snp.json", "nodes.npz"):
            (snp / name).write_bytes((run.snp / name).read_bytes())
        old = _snapshot(snp)
        _fill(full)
        line = run_error(["snp", "--checkpoint", str(run.ckpt), "--out", str(snp), "--threshold", "0.5"]
                         + SNP_FAST, capsys)
        assert "No space left on device" in line
        assert {p: v for p, v in _snapshot(snp).items() if p.name != ".cctk.lock"} == old
        line = run_error(["eval", "--checkpoint", str(run.ckpt), "--device", "cpu",
                          "--out", str(full / "eval.json")], capsys)
        assert "No space left on device" in line
        assert sorted(os.listdir(full)) == ["filler", "snp"]
        assert not [n for n in os.listdir(snp) if n.startswith(".tmp-")]


# ---------------------------------------------------------------------------------------------
# the failure classes that need a run of their own

TINY = ["--dataset", "digits", "--epochs", "1", "--train-subset", "64", "--test-subset", "32",
        "--no-verbose"] + FAST


def test_a_directory_without_a_checkpoint_holds_no_run(tmp_path, capsys):
    """kill -9 before the first checkpoint (a study's seed, a train run) leaves logs and a lock
    file but no checkpoint: a plain rerun and --resume both start the run, asking nothing."""
    for i, extra in enumerate(([], ["--resume"])):
        out = tmp_path / f"killed{i}"
        out.mkdir()
        (out / "metrics.jsonl").write_text("")
        (out / "metrics.json").write_text("{}")      # an older run's, its checkpoint deleted
        (out / ".cctk.lock").write_text("")
        run_ok(["train", "--out", str(out)] + TINY + extra, capsys)
        m = json.loads((out / "metrics.json").read_text())
        assert m["epochs"] == 1 and m["resumed_from_epoch"] is None
        assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
        assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.json", "metrics.jsonl"]


def test_a_study_directory_without_results_or_checkpoints_holds_no_study(tmp_path):
    """A study stopped before its first checkpoint keeps no settings a rerun must match."""
    from cctk.experiments.study_cli import _forget_a_study_that_did_nothing

    out = tmp_path / "study"
    (out / "seed0" / "train").mkdir(parents=True)
    (out / "seed0" / "train" / "metrics.jsonl").write_text("")
    (out / "study_config.json").write_text('{"epochs": 99}')
    _forget_a_study_that_did_nothing(str(out))
    assert not (out / "study_config.json").exists()
    for work in ("seed0/train/checkpoint.pt", "results.csv", "seed1/snp/snp.json"):
        (out / "study_config.json").write_text('{"epochs": 99}')
        (out / work).parent.mkdir(parents=True, exist_ok=True)
        (out / work).write_text("")
        _forget_a_study_that_did_nothing(str(out))
        assert (out / "study_config.json").exists(), work
        (out / work).unlink()


def test_full_disk_during_torch_save_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    """torch.save on a full disk raises RuntimeError (its writer hides the OSError): the command
    reports the disk, exits 2, and the run it started leaves no file behind."""
    import errno
    import io

    import cctk.checkpoint as checkpoint

    real = os.fdopen

    class Full(io.FileIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    def fdopen(fd, mode="r", *a, **k):  # binary writes (torch.save) hit a full disk; text gets through
        return Full(fd, "w") if "b" in mode else real(fd, mode, *a, **k)

    monkeypatch.setattr(checkpoint.os, "fdopen", fdopen)
    out = tmp_path / "run"
    line = run_error(["train", "--out", str(out)] + TINY, capsys)
    assert "No space left on device" in line and "checkpoint.pt" in line
    assert not out.exists()


def test_eval_without_optimize_in_bfloat16_and_its_report(run, tmp_path, capsys):
    report = tmp_path / "eval.json"
    for _ in range(2):                   # the second run replaces its own earlier report
        out = run_ok(["eval", "--checkpoint", str(run.ckpt), "--device", "cpu", "--no-optimize",
                      "--dtype", "bfloat16", "--out", str(report)], capsys)
        assert "(bfloat16)" in out
        r = json.loads(report.read_text())
        assert r["dtype"] == "bfloat16" and not r["optimized"] and r["accuracy"] > 0.5


def test_snp_rerun_without_plots_removes_the_earlier_figures(run, tmp_path, capsys):
    snp = tmp_path / "snp"
    snp.mkdir()
    for name in ("snp.json", "nodes.npz"):
        (snp / name).write_bytes((run.snp / name).read_bytes())
    for name in ("node_matrices.png", "blocks.png", "heads_block0.png", "heads_block7.png"):
        (snp / name).write_bytes(b"\x89PNG an earlier run's figure")
    (snp / "notes.png").write_bytes(b"the user's own file")
    run_ok(["snp", "--checkpoint", str(run.ckpt), "--out", str(snp)] + SNP_FAST, capsys)
    assert sorted(p.name for p in snp.iterdir()) == ["nodes.npz", "notes.png", "snp.json"]
    with np.load(snp / "nodes.npz") as z:     # the pair names the checkpoint in both files
        digest = str(z["checkpoint_sha256"])
    assert digest == json.loads((snp / "snp.json").read_text())["config"]["checkpoint_sha256"]
