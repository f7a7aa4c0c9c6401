"""cctk.train: schedule, optimiser groups, evaluation, checkpoints (atomic, round trip), exact
resume, a short digits run that learns, metrics.json, and 2-process DDP through torchrun.

Kept small for a 2-core CPU: the digits model (cct_2_3x1_8, 16 tokens), subsets, 1-3 epochs,
one intra-op thread.
"""
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

from cctk import data, models
from cctk.train import (ConfigError, PRESETS, TrainConfig, WarmupCosine, build_optimizer,
                        build_scheduler, evaluate, get_preset, load_checkpoint, resolve_amp, train)
from cctk.checkpoint import atomic_save, read_checkpoint
from cctk.train.state import checkpoint_dict, epoch_seed
from cctk.train.loop import make_grad_scaler, train_one_epoch


def tiny_config(out, **kw):
    """Digits, small subsets, CPU (bit-exact comparisons), 1 thread, quiet."""
    base = get_preset("digits").to_dict()
    base.update(out=str(out), epochs=3, warmup_epochs=1, batch_size=32, train_subset=160,
                test_subset=96, verbose=False, progress=False, cpu_threads=1, device="cpu")
    base.update(kw)
    return TrainConfig.from_dict(base)


# ------------------------------------------------------------------------------------------
# the short digits run shared by several tests


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits_run")
    cfg = tiny_config(out, epochs=3, train_subset=None, test_subset=None)
    metrics = train(cfg)
    return out, cfg, metrics


def test_short_digits_run_learns(digits_run):
    _, _, metrics = digits_run
    # chance is 0.10; three epochs of the digits preset reach ~0.9
    assert metrics["test_accuracy"] > 0.6, metrics["test_accuracy"]
    hist = metrics["history"]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]


def test_metrics_json_format(digits_run):
    out, cfg, metrics = digits_run
    with open(out / "metrics.json") as f:
        on_disk = json.load(f)
    assert on_disk["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert 0.0 <= on_disk["test_accuracy"] <= 1.0
    for key in ("train_loss", "epochs", "model", "dataset", "wall_time_s", "history",
                "world_size", "config", "parameters", "test_samples"):
        assert key in on_disk, key
    assert on_disk["epochs"] == 3 and on_disk["model"] == "cct_2_3x1_8"
    assert on_disk["dataset"] == "digits" and on_disk["world_size"] == 1
    assert on_disk["test_samples"] == 360 and on_disk["wall_time_s"] > 0
    assert [r["epoch"] for r in on_disk["history"]] == [1, 2, 3]
    for r in on_disk["history"]:
        assert {"train_loss", "test_accuracy", "test_loss", "lr", "samples"} <= set(r)
    # the per-epoch log has one JSON line per epoch, equal to the history
    with open(out / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    assert lines == on_disk["history"]
    assert on_disk["history"][-1]["test_accuracy"] == on_disk["test_accuracy"]
    assert TrainConfig.from_dict(on_disk["config"]) == cfg.replace()


def test_checkpoint_contents_and_round_trip(digits_run):
    out, cfg, metrics = digits_run
    ckpt = read_checkpoint(out / "checkpoint.pt")
    assert ckpt["epoch"] == 3
    assert ckpt["model_config"]["name"] == "cct_2_3x1_8"
    assert ckpt["dataset"]["name"] == "digits" and ckpt["dataset"]["num_classes"] == 10
    assert TrainConfig.from_dict(ckpt["train_config"]) == cfg
    for key in ("optimizer", "scheduler", "scaler", "rng", "sampler", "metrics", "state_dict"):
        assert ckpt[key] is not None, key
    assert {"torch", "numpy", "python"} <= set(ckpt["rng"])
    model, ckpt2 = load_checkpoint(out / "checkpoint.pt")
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["state_dict"][k]), k
    # the rebuilt model reproduces the run's final test accuracy exactly
    test = data.get_dataset("digits", "test")
    res = evaluate(model, data.build_loader(test, 128, shuffle=False), "cpu")
    assert res["accuracy"] == metrics["test_accuracy"]
    assert res["n"] == 360


def test_load_checkpoint_outputs_equal(tmp_path):
    torch.manual_seed(0)
    model = models.create_model("cct_2_3x1_8", num_classes=7)
    model.eval()
    atomic_save(checkpoint_dict(model=model, dataset={"name": "digits"}, train_config={},
                                epoch=0), tmp_path / "c.pt")
    loaded, ckpt = load_checkpoint(tmp_path / "c.pt")
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded.num_classes == 7


def test_atomic_save_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "c.pt"
    atomic_save({"a": torch.ones(2)}, path)
    with pytest.raises(Exception):
        atomic_save({"bad": lambda: 0}, path)   # lambdas cannot be pickled
    assert torch.equal(torch.load(path)["a"], torch.ones(2))
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]   # no temporary file left behind


def test_read_checkpoint_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        read_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read"):
        read_checkpoint(tmp_path / "junk.pt")
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="not a cctk checkpoint"):
        read_checkpoint(tmp_path / "other.pt")


# ------------------------------------------------------------------------------------------
# exact resume


@pytest.mark.parametrize("mixing", [False, True], ids=["plain", "augment+mixup+cutmix"])
def test_resume_is_bit_exact(tmp_path, mixing):
    """Interrupted after epoch 1 and resumed == uninterrupted: every parameter and buffer
    torch.equal, and the same per-epoch losses. Dropout/stochastic depth (the models' defaults)
    and, in the second case, crop augmentation + Mixup/CutMix exercise every RNG."""
    extra = dict(augment="basic", mixup=0.8, cutmix=1.0) if mixing else {}
    full = train(tiny_config(tmp_path / "full", **extra))

    class Interrupt(Exception):
        pass

    def stop_after_first(epoch, record):
        if epoch == 0:
            raise Interrupt

    cfg = tiny_config(tmp_path / "cut", **extra)
    with pytest.raises(Interrupt):
        train(cfg, on_epoch_end=stop_after_first)
    assert read_checkpoint(tmp_path / "cut" / "checkpoint.pt")["epoch"] == 1
    # disturb the global RNGs: a resumed process starts from arbitrary states
    torch.manual_seed(1234)
    resumed = train(cfg.replace(resume="auto"))

    a, _ = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b, ckpt_b = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs after resume"
    assert ckpt_b["epoch"] == 3 and resumed["resumed_from_epoch"] == 1
    assert [r["train_loss"] for r in resumed["history"]] == [r["train_loss"] for r in full["history"]]
    assert resumed["test_accuracy"] == full["test_accuracy"]
    # the optimiser state continued too
    oa = torch.load(tmp_path / "full" / "checkpoint.pt")["optimizer"]["state"]
    ob = torch.load(tmp_path / "cut" / "checkpoint.pt")["optimizer"]["state"]
    for i in oa:
        assert torch.equal(oa[i]["exp_avg_sq"], ob[i]["exp_avg_sq"])


def test_resume_rejects_other_model(tmp_path):
    cfg = tiny_config(tmp_path, epochs=1, train_subset=64, test_subset=32)
    train(cfg)
    with pytest.raises(ConfigError, match="cannot resume"):
        train(cfg.replace(model="cct_2_3x1_8_sine", resume="auto", epochs=2))


def test_epoch_seed_depends_on_seed_epoch_rank_only():
    assert epoch_seed(0, 3, 0) == epoch_seed(0, 3, 0)
    assert len({epoch_seed(s, e, r) for s in range(3) for e in range(3) for r in range(2)}) == 18


# ------------------------------------------------------------------------------------------
# schedule, optimiser, evaluation, AMP, clipping


def test_warmup_cosine_values():
    f = WarmupCosine(lr=1e-3, warmup_steps=10, cosine_end_step=110, warmup_lr=1e-6, min_lr=1e-5)
    assert f.lr_at(0) == pytest.approx(1e-6)
    assert f.lr_at(5) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5)
    assert f.lr_at(10) == pytest.approx(1e-3)
    assert f.lr_at(60) == pytest.approx((1e-3 + 1e-5) / 2)
    assert f.lr_at(110) == pytest.approx(1e-5) and f.lr_at(500) == pytest.approx(1e-5)
    lrs = [f.lr_at(s) for s in range(10, 111)]
    assert all(x >= y for x, y in zip(lrs, lrs[1:]))   # cosine decays monotonically


def test_scheduler_drives_optimizer_per_step():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = build_scheduler(opt, 1e-3, steps_per_epoch=5, epochs=4, warmup_epochs=1,
                            warmup_lr=1e-6, min_lr=1e-5)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ref = WarmupCosine(1e-3, 5, 20, 1e-6, 1e-5)
    assert seen == pytest.approx([ref.lr_at(s) for s in range(20)])


def test_weight_decay_groups():
    model = models.create_model("cct_2_3x1_8")
    opt = build_optimizer(model, 1e-3, 0.05)
    no_decay, decay = opt.param_groups
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 for p in decay["params"])
    assert all(p.ndim <= 1 or names[id(p)].endswith(".bias") for p in no_decay["params"])
    assert len(no_decay["params"]) + len(decay["params"]) == len(list(model.parameters()))


def test_evaluate_matches_manual_count():
    torch.manual_seed(0)
    model = models.create_model("cct_2_3x1_8")
    ds = data.get_dataset("digits", "test")
    res = evaluate(model, data.build_loader(ds, 50, shuffle=False), "cpu")
    model.eval()
    with torch.no_grad():
        xs = torch.stack([ds[i][0] for i in range(len(ds))])
        ys = torch.tensor([ds[i][1] for i in range(len(ds))])
        logits = model(xs)
    assert res["n"] == len(ds)
    assert res["accuracy"] == pytest.approx((logits.argmax(1) == ys).float().mean().item())
    assert res["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, ys).item(), rel=1e-5)


def test_resolve_amp():
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) is None
    assert resolve_amp("off", cpu) is None
    assert resolve_amp("bf16", cpu) is torch.bfloat16
    with pytest.raises(ConfigError, match="CUDA"):
        resolve_amp("fp16", cpu)


def test_bf16_autocast_run_on_cpu(tmp_path):
    m = train(tiny_config(tmp_path, epochs=1, amp="bf16", train_subset=64, test_subset=32))
    assert m["amp"] == "bfloat16" and math.isfinite(m["train_loss"])


def test_gradient_clipping_bounds_the_norm():
    torch.manual_seed(0)
    model = models.create_model("cct_2_3x1_8")
    ds = data.get_dataset("digits", "train")
    loader = data.build_loader(torch.utils.data.Subset(ds, range(64)), 32, shuffle=False)
    opt = build_optimizer(model, 1e-3, 0.05)
    sched = build_scheduler(opt, 1e-3, 2, 1, 0, 1e-3, 1e-3)
    scaler = make_grad_scaler(False)
    train_one_epoch(model, loader, opt, sched, scaler, torch.nn.CrossEntropyLoss(), torch.device("cpu"),
                    clip_grad=0.05)
    norm = torch.norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    assert norm <= 0.05 * (1 + 1e-4)


# ------------------------------------------------------------------------------------------
# configuration and presets


def test_reference_presets():
    c100 = get_preset("cifar100")
    assert (c100.model, c100.dataset, c100.epochs, c100.batch_size) == ("cct_7_3x1_32", "cifar100", 300, 128)
    assert (c100.lr, c100.weight_decay, c100.warmup_epochs, c100.label_smoothing) == (6e-4, 6e-2, 10, 0.1)
    assert (c100.mixup, c100.cutmix, c100.randaugment) == (0.8, 1.0, "rand-m9-mstd0.5-inc1")
    assert (c100.min_lr, c100.cooldown_epochs) == (1e-5, 10)
    fl = get_preset("flowers102")
    assert (fl.model, fl.img_size, fl.batch_size, fl.lr) == ("cct_7_7x2_224_sine", 224, 96, 5e-4)
    for name in PRESETS:
        cfg = get_preset(name)
        cfg.validate()
        assert cfg.model is None or cfg.model in models.list_models()
        data.dataset_info(cfg.dataset)


def test_config_round_trip_and_validation():
    cfg = get_preset("cifar100", epochs=5)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown TrainConfig"):
        TrainConfig.from_dict({"nope": 1})
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("imagenet-21k")
    for bad in (dict(epochs=0), dict(lr=-1.0), dict(amp="fp8"), dict(label_smoothing=1.0),
                dict(augment="basic", hflip=0.5), dict(crop="zoom")):
        with pytest.raises(ConfigError):
            TrainConfig(**bad).validate()


def test_train_user_errors_write_nothing(tmp_path):
    with pytest.raises(ConfigError, match="unknown model"):
        train(tiny_config(tmp_path / "a", model="cct_99"))
    with pytest.raises(ConfigError, match="unknown dataset"):
        train(tiny_config(tmp_path / "b", dataset="imagenet-9"))
    with pytest.raises(ConfigError, match="cifar10"):
        train(tiny_config(tmp_path / "c", dataset="cifar10", model=None,
                          data_dir=str(tmp_path / "nowhere")))
    assert not any((tmp_path / d).exists() for d in "abc")


# ------------------------------------------------------------------------------------------
# DDP: two CPU processes through torchrun


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           f"--master_port={_free_port()}", "-m", "cctk.cli", "train", "--dataset", "digits",
           "--epochs", "1", "--train-subset", "200", "--test-subset", "101", "--batch-size", "25",
           "--device", "cpu", "--no-progress", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2
    # each rank trained on its own half (torch's DistributedSampler over the 2 ranks)
    assert m["history"][0]["samples_per_rank"] == [100, 100]
    sampler = torch.load(out / "checkpoint.pt", weights_only=True)["sampler"]
    assert sampler["sampler"] == "DistributedSampler" and sampler["world_size"] == 2
    # evaluation counts were summed over the ranks' disjoint shards (51 + 50)
    assert m["test_samples"] == 101
    assert 0.0 <= m["test_accuracy"] <= 1.0
    assert (out / "checkpoint.pt").exists()
    assert proc.stdout.count("done: test accuracy") == 1   # only rank 0 reports


def test_resume_extends_schedule_and_finished_run(tmp_path):
    cfg = tiny_config(tmp_path, epochs=1, warmup_epochs=0, train_subset=64, test_subset=32)
    first = train(cfg)
    # resuming a finished run trains nothing more and reports the same final model
    again = train(cfg.replace(resume="auto"))
    assert again["epochs"] == 1 and again["test_accuracy"] == first["test_accuracy"]
    # extending to 3 epochs continues with the longer cosine (not stuck at min_lr)
    longer = train(cfg.replace(resume="auto", epochs=3))
    assert longer["epochs"] == 3 and longer["resumed_from_epoch"] == 1
    lrs = [r["lr"] for r in longer["history"]]
    ref = WarmupCosine(cfg.lr, 0, 3 * 2, cfg.warmup_lr, cfg.min_lr)
    assert lrs[1] == pytest.approx(ref.lr_at(4)) and lrs[1] > 10 * cfg.min_lr
    assert lrs[2] == pytest.approx(cfg.min_lr)


@pytest.mark.cuda
def test_cuda_bf16_run_learns(tmp_path):
    """On a GPU, amp="auto" trains under bf16 autocast; the checkpoint loads back on the CPU."""
    m = train(tiny_config(tmp_path, device="cuda", amp="auto", epochs=3, train_subset=None,
                          test_subset=None))
    assert m["device"].startswith("cuda") and m["amp"] == "bfloat16"
    assert m["test_accuracy"] > 0.6
    model, ckpt = load_checkpoint(tmp_path / "checkpoint.pt", map_location="cpu")
    assert next(model.parameters()).device.type == "cpu" and ckpt["epoch"] == 3
