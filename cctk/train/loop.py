"""The training loop: AdamW + warm-up/cosine, label smoothing, Mixup/CutMix soft targets,
gradient clipping, mixed precision, tqdm bars, per-epoch metrics log, atomic checkpoints,
exact resume, and DDP under torchrun."""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

from cctk import data, models
from cctk.checkpoint import (atomic_save, atomic_write_text, is_pruned_checkpoint, output_dir,
                             plain, read_checkpoint)
from cctk.data import MixupCutmix, set_loader_epoch
from cctk.train.config import ConfigError, TrainConfig
from cctk.train.distributed import DistContext, setup_distributed
from cctk.train.state import (checkpoint_dict, epoch_seed, restore_rng_state, seed_everything,
                              unwrap)
from cctk.train.optim import build_optimizer, build_scheduler

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.json"
METRICS_LOG_NAME = "metrics.jsonl"

# --------------------------------------------------------------------------------------------
# mixed precision


def resolve_amp(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for ``amp`` on ``device`` (None: full fp32).

    ``auto``: bf16 on a CUDA device that supports it, otherwise off (CPU autocast is slower than
    fp32 on most CPUs); ``bf16``: on CPU or CUDA; ``fp16``: CUDA only (with a GradScaler)."""
    if amp == "off":
        return None
    if amp == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise ConfigError("amp=fp16 needs a CUDA device; use --amp bf16 or --amp off on CPU")
        return torch.float16
    raise ConfigError(f"amp must be one of auto, bf16, fp16, off (got {amp!r})")


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(enabled: bool):
    """A CUDA GradScaler (fp16 autocast); with ``enabled=False`` its calls are pass-throughs,
    so the loop has one code path for every precision."""
    return torch.amp.GradScaler("cuda", enabled=enabled)


# --------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate(model: nn.Module, loader, device, amp_dtype: Optional[torch.dtype] = None,
             distributed: bool = False) -> Dict[str, float]:
    """Top-1 accuracy (a fraction) and mean cross-entropy (no smoothing) of ``model`` over
    ``loader``: ``accuracy = #{argmax z = y} / n``, ``loss = -(1/n) sum log softmax(z)_y``.

    With ``distributed=True`` (inside an initialised process group) every rank passes its own
    disjoint shard and the correct counts, loss sums and sample counts are summed over ranks,
    so every rank returns the metrics of the whole set. The model's train/eval mode is restored.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    correct = 0.0
    loss_sum = 0.0
    n = 0.0
    try:
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            with _autocast(device, amp_dtype):
                logits = model(x)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(dim=1) == y).sum().item()
            n += y.numel()
    finally:
        model.train(was_training)
    if distributed:
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_world_size() > 1:
            comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
            t = torch.tensor([correct, loss_sum, n], dtype=torch.float64, device=comm)
            dist.all_reduce(t)
            correct, loss_sum, n = t.tolist()
    if n == 0:
        return {"accuracy": float("nan"), "loss": float("nan"), "n": 0}
    return {"accuracy": correct / n, "loss": loss_sum / n, "n": int(n)}


# --------------------------------------------------------------------------------------------
# set-up: data + model


@dataclass
class Setup:
    model: nn.Module
    model_name: str
    train_set: Any
    test_set: Any
    dataset: Dict[str, Any]     # name + options + shape facts, stored in checkpoints/metrics


def _user_error(exc: BaseException, what: str) -> ConfigError:
    msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return ConfigError(f"{what}: {msg}")


def model_kwargs(config: TrainConfig) -> Dict[str, Any]:
    """Optional model overrides from the config (only those that are set)."""
    kw: Dict[str, Any] = {}
    if config.positional_embedding is not None:
        kw["positional_embedding"] = config.positional_embedding
    for field, name in (("drop_rate", "dropout"), ("attn_drop_rate", "attention_dropout"),
                        ("drop_path_rate", "stochastic_depth")):
        v = getattr(config, field)
        if v is not None:
            kw[name] = v
    return kw


def check_model_input(model: nn.Module, in_channels: int, img_size: int, device="cpu") -> None:
    """Run one zero image of shape (1, C, H, W) through ``model``; a shape failure becomes a
    ConfigError naming the model and the size."""
    name = getattr(unwrap(model), "config", {}).get("name", type(model).__name__)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_channels, img_size, img_size, device=device))
    except (RuntimeError, ValueError, IndexError) as exc:
        raise ConfigError(f"model {name} cannot take {in_channels}x{img_size}x{img_size} "
                          f"images: {exc}") from exc
    finally:
        model.train(was_training)


def dataset_options(config: TrainConfig) -> Dict[str, Any]:
    """The options the training split is loaded with (stored in checkpoints)."""
    return {"augment": config.augment_spec(), "mixup": config.mixup, "cutmix": config.cutmix,
            "mixup_prob": config.mixup_prob, "mixup_switch_prob": config.mixup_switch_prob,
            "mixup_off_epoch": config.mixup_off_epoch}


def prepare(config: TrainConfig, device="cpu") -> Setup:
    """Build the train/test datasets and the model for ``config`` (model seeded with
    ``config.seed``), checking that the model takes the dataset's images. Every user error
    (unknown dataset or model, missing data, bad size) is raised as :class:`ConfigError`."""
    try:
        info = data.dataset_info(config.dataset)
    except (KeyError, ValueError, data.DataError) as exc:
        raise ConfigError(str(exc.args[0] if exc.args else exc)) from exc
    model_name = config.model or info.default_model
    if model_name not in models.list_models():
        raise ConfigError(f"unknown model {model_name!r}; `cctk models` lists the "
                          f"{len(models.list_models())} available names")
    record = {"name": info.name, "data_dir": config.data_dir, "img_size": config.img_size,
              "eval_split": info.eval_split,
              "dataset_options": plain(dict(config.dataset_options or {}))}
    try:
        train_set = data.from_record(record, "train", augment=config.augment_spec(),
                                     download=config.download)
        test_set = data.from_record(record, "eval", download=config.download)
    except ConfigError:
        raise
    except (data.DataError, KeyError, ValueError, OSError) as exc:
        raise _user_error(exc, f"dataset {info.name!r}") from exc
    num_classes, in_channels, img_size = train_set.num_classes, train_set.in_channels, train_set.img_size
    seed_everything(config.seed)
    try:
        model = models.create_model(model_name, num_classes=num_classes, img_size=img_size,
                                    in_channels=in_channels, **model_kwargs(config))
    except (KeyError, ValueError, TypeError) as exc:
        raise _user_error(exc, f"model {model_name!r}") from exc
    check_model_input(model, in_channels, img_size)
    if config.train_subset is not None and config.train_subset < len(train_set):
        train_set = data.subset_dataset(train_set, config.train_subset)
    if config.test_subset is not None and config.test_subset < len(test_set):
        test_set = data.subset_dataset(test_set, config.test_subset)
    dataset = {**record, "img_size": img_size,
               "in_channels": in_channels, "num_classes": num_classes,
               "train_size": len(train_set), "test_size": len(test_set),
               "options": plain(dataset_options(config)),
               "train_subset": config.train_subset, "test_subset": config.test_subset}
    return Setup(model=model, model_name=model_name, train_set=train_set, test_set=test_set,
                 dataset=dataset)


# --------------------------------------------------------------------------------------------
# loaders and per-epoch randomness


def _build_train_loader(config: TrainConfig, train_set, ctx: DistContext):
    shard = len(train_set) // ctx.world_size
    return data.build_loader(train_set, config.batch_size, shuffle=True,
                             num_workers=config.num_workers, distributed=ctx.distributed,
                             seed=config.seed, drop_last=shard >= config.batch_size)


def _build_eval_loader(config: TrainConfig, test_set, ctx: DistContext):
    """Each rank gets the disjoint shard ``rank::world_size`` (no padding, so the summed counts
    are exact)."""
    if ctx.distributed:
        test_set = Subset(test_set, range(ctx.rank, len(test_set), ctx.world_size))
    bs = config.eval_batch_size or 2 * config.batch_size
    return data.build_loader(test_set, bs, shuffle=False, num_workers=config.num_workers,
                             distributed=False, seed=config.seed, drop_last=False)


def _start_epoch_randomness(loader, config: TrainConfig, epoch: int, rank: int) -> None:
    """Make the epoch's shuffling, augmentation, mixup and dropout a function of
    (seed, epoch, rank) only: the loader's sampler order and worker seeds via
    ``cctk.data.set_loader_epoch``, and the global RNGs (augmentation in the main process,
    Mixup/CutMix, dropout, stochastic depth) reseeded with :func:`epoch_seed`."""
    set_loader_epoch(loader, epoch)
    seed_everything(epoch_seed(config.seed, epoch, rank))


# --------------------------------------------------------------------------------------------
# one epoch


def _progress(iterable, enabled: bool, desc: str, total: Optional[int] = None):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


def _mixer(config: TrainConfig, num_classes: int):
    """A callable ``(x, y) -> (x_mixed, soft_targets)`` from cctk.data, or None when off."""
    if not config.mixing:
        return None
    # label smoothing is applied by the loss, on the mixed targets (same result as timm's
    # smoothing inside the mix: (1-eps) (lam oh_a + (1-lam) oh_b) + eps/K)
    return MixupCutmix(num_classes=num_classes, mixup_alpha=config.mixup,
                       cutmix_alpha=config.cutmix, prob=config.mixup_prob,
                       switch_prob=config.mixup_switch_prob, label_smoothing=0.0)


def train_one_epoch(model, loader, optimizer, scheduler, scaler, criterion, device, *,
                    amp_dtype=None, clip_grad=None, mixer=None, progress=False,
                    desc="train") -> Dict[str, float]:
    """One pass over ``loader``; ``scheduler.step()`` after every optimiser step. Returns this
    rank's sums: loss_sum, correct (hard labels; 0 when batches are mixed), samples, steps."""
    model.train()
    loss_sum = 0.0
    correct = 0
    samples = 0
    steps = 0
    bar = _progress(loader, progress, desc, total=len(loader))
    for x, y in bar:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        target = y
        if mixer is not None:
            x, target = mixer(x, y)
        with _autocast(device, amp_dtype):
            logits = model(x)
        loss = criterion(logits.float(), target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if clip_grad is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        b = y.shape[0]
        loss_sum += loss.item() * b
        if mixer is None:
            correct += (logits.detach().argmax(dim=1) == y).sum().item()
        samples += b
        steps += 1
        if progress and hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss_sum / samples:.4f}",
                            lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    return {"loss_sum": loss_sum, "correct": correct, "samples": samples, "steps": steps}


# --------------------------------------------------------------------------------------------
# the run


def _resume_path(config: TrainConfig) -> Optional[str]:
    """The checkpoint a run continues from, or None for a new run. ``--resume`` with no path
    (``auto``) continues ``<out>/checkpoint.pt`` when there is one; without it the directory
    holds no run (a run killed before its first checkpoint), and a new run starts."""
    if config.resume is None:
        return None
    if config.resume in ("auto", "last", "1", "true", "True"):
        path = os.path.join(config.out, CHECKPOINT_NAME)
        return path if os.path.lexists(path) else None
    return config.resume


def train(config: TrainConfig,
          on_epoch_end: Optional[Callable[[int, Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Train ``config.model`` on ``config.dataset`` and return the final metrics dict (also
    written to ``<out>/metrics.json`` by rank 0), with ``test_accuracy`` of the final model.

    Under torchrun (``WORLD_SIZE`` > 1) it joins the process group, trains with DDP on
    disjoint DistributedSampler shards, sums evaluation counts over ranks, writes files from
    rank 0 only and destroys the group at the end. ``on_epoch_end(epoch, record)`` is called
    after each epoch's checkpoint is written (tests use it to interrupt a run)."""
    config = TrainConfig.from_dict(config.to_dict()).validate()
    ctx = setup_distributed(config.device)
    threads_before = torch.get_num_threads()
    try:
        if config.cpu_threads is not None and ctx.device.type == "cpu":
            torch.set_num_threads(config.cpu_threads)
        with contextlib.ExitStack() as held:
            return _train(config, ctx, on_epoch_end, held)
    finally:
        if torch.get_num_threads() != threads_before:
            torch.set_num_threads(threads_before)
        ctx.close()


def _out_problem(config: TrainConfig, resuming: bool) -> Optional[str]:
    """Why ``--out`` cannot take this run, or None: a file in its place, or (for a new run
    without --overwrite) the files of another run, which a new run never replaces."""
    if os.path.exists(config.out) and not os.path.isdir(config.out):
        return f"--out {config.out} is a file, not a directory; choose a directory"
    own = os.path.join(config.out, CHECKPOINT_NAME)
    source = _resume_path(config)
    if (resuming and not config.overwrite and os.path.lexists(own) and source is not None
            and not (os.path.exists(source) and os.path.samefile(source, own))):
        return (f"--out {config.out} holds another run ({CHECKPOINT_NAME}); resume {source} into its "
                f"own directory or an empty one, or replace this run with --overwrite")
    if resuming or config.overwrite:
        return None
    # a directory without a checkpoint holds no run (one killed before its first checkpoint,
    # or its checkpoint deleted): a new run starts there, replacing the leftover logs
    if os.path.lexists(os.path.join(config.out, CHECKPOINT_NAME)):
        return (f"--out {config.out} already holds a run ({CHECKPOINT_NAME}); continue it with "
                f"--resume, replace it with --overwrite, or choose another --out")
    return None


#: TrainConfig fields a resumed run may change: how long it runs (the schedule is stretched),
#: where and how it runs and reports. Every other field makes it another run.
RESUME_MAY_CHANGE = ("epochs", "cooldown_epochs", "device", "progress", "verbose", "num_workers",
                     "cpu_threads", "eval_every", "save_every", "eval_batch_size", "data_dir",
                     "download", "resume", "overwrite", "out")


def resume_changes(saved: Dict[str, Any], config: TrainConfig) -> List[str]:
    """The fields of ``config`` that differ from a checkpoint's ``train_config`` and would make
    the resumed run another run (its data, model, optimisation or randomness)."""
    now = plain(config.to_dict())
    old = plain(TrainConfig.from_dict(saved).to_dict())
    return [k for k in now if k not in RESUME_MAY_CHANGE and now[k] != old.get(k)]


def _start_clean(out: str, held: contextlib.ExitStack) -> None:
    """A new run in ``out``: the logs of an earlier run there (one that never wrote a
    checkpoint, or --overwrite) go now, and if this run ends before its first checkpoint (an
    error, a full disk) the log it started goes too: a directory holds a run's files only
    beside the run's checkpoint."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(out, METRICS_NAME))

    def drop_log_without_checkpoint():
        if not os.path.lexists(os.path.join(out, CHECKPOINT_NAME)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(out, METRICS_LOG_NAME))
    held.callback(drop_log_without_checkpoint)


def _train(config: TrainConfig, ctx: DistContext, on_epoch_end,
           held: contextlib.ExitStack) -> Dict[str, Any]:
    t_start = time.perf_counter()
    device = ctx.device
    amp_dtype = resolve_amp(config.amp, device)
    resume_from = _resume_path(config)
    ckpt = read_resume_checkpoint(resume_from) if resume_from else None

    # rank 0 decides for every rank (the others must not hang waiting for it)
    problem = _out_problem(config, ckpt is not None) if ctx.is_main else None
    if ctx.distributed:
        problem = ctx.all_gather_object(problem)[0]
    if problem:
        raise ConfigError(problem)
    setup = prepare(config, device)
    if ckpt is not None:
        _check_resumable(ckpt, setup, resume_from, config)
    if ctx.is_main:
        # one run per directory for the run's whole lifetime (a second one is refused, not
        # interleaved); checked again under the lock, which also clears killed writes' temp files
        held.enter_context(output_dir(config.out, "--out"))
        problem = _out_problem(config, ckpt is not None)
        if problem:
            raise ConfigError(problem)
        if ckpt is None:
            _start_clean(config.out, held)
    model = setup.model.to(device)
    if ckpt is not None:
        unwrap(model).load_state_dict(ckpt["state_dict"], strict=True)
    model.train()   # before DDP sees the parameters: the tokenizer sets its training layout here
    if ctx.distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    train_loader = _build_train_loader(config, setup.train_set, ctx)
    eval_loader = _build_eval_loader(config, setup.test_set, ctx)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ConfigError(f"no training batches: {len(setup.train_set)} samples, batch size "
                          f"{config.batch_size}, {ctx.world_size} process(es)")
    optimizer = build_optimizer(unwrap(model), config.lr, config.weight_decay, config.betas)
    scheduler = build_scheduler(optimizer, config.lr, steps_per_epoch, config.epochs,
                                config.warmup_epochs, config.warmup_lr, config.min_lr)
    scaler = make_grad_scaler(amp_dtype == torch.float16)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    mixer = _mixer(config, setup.dataset["num_classes"])

    start_epoch = 0
    history: List[Dict[str, Any]] = []
    wall_before = 0.0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        _restore_scheduler(scheduler, optimizer, ckpt["scheduler"], config)
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch = int(ckpt["epoch"])
        history = list((ckpt.get("metrics") or {}).get("history", []))
        wall_before = float((ckpt.get("metrics") or {}).get("wall_time_s", 0.0))
        restore_rng_state(ckpt["rng"])
        was = (ckpt.get("sampler") or {}).get("world_size")
        if was is not None and was != ctx.world_size and ctx.is_main:
            warnings.warn(f"resuming a run of {was} process(es) with {ctx.world_size}: the "
                          f"data order (and so the weights) will differ from an uninterrupted "
                          f"run", RuntimeWarning, stacklevel=2)

    out = config.out
    log_path = os.path.join(out, METRICS_LOG_NAME)
    if ctx.is_main:
        atomic_write_text("".join(json.dumps(r) + "\n" for r in history), log_path)
    show_progress = (config.progress if config.progress is not None
                     else sys.stderr.isatty()) and ctx.is_main
    n_params = sum(p.numel() for p in unwrap(model).parameters())
    if config.verbose and ctx.is_main:
        what = "resuming" if ckpt is not None else "training"
        print(f"{what} {setup.model_name} ({n_params:,} parameters) on {config.dataset} "
              f"({setup.dataset['train_size']} train / {setup.dataset['test_size']} test, "
              f"{setup.dataset['in_channels']}x{setup.dataset['img_size']}x"
              f"{setup.dataset['img_size']}, {setup.dataset['num_classes']} classes) "
              f"on {device} x{ctx.world_size}, epochs {start_epoch + 1}..{config.total_epochs}, "
              f"amp {amp_dtype if amp_dtype is not None else 'off'}", flush=True)

    last_eval: Optional[Dict[str, float]] = None
    total = config.total_epochs
    unlogged: List[Dict[str, Any]] = []  # metrics.jsonl never runs ahead of checkpoint.pt
    for epoch in range(start_epoch, total):
        t0 = time.perf_counter()
        _start_epoch_randomness(train_loader, config, epoch, ctx.rank)
        use_mix = mixer is not None and (config.mixup_off_epoch <= 0 or epoch < config.mixup_off_epoch)
        sums = train_one_epoch(model, train_loader, optimizer, scheduler, scaler, criterion, device,
                               amp_dtype=amp_dtype, clip_grad=config.clip_grad,
                               mixer=mixer if use_mix else None, progress=show_progress,
                               desc=f"epoch {epoch + 1}/{total}")
        loss_sum, correct, samples = ctx.all_reduce_sum(
            [sums["loss_sum"], sums["correct"], sums["samples"]])
        samples_per_rank = ctx.all_gather_object(int(sums["samples"]))
        record: Dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(samples, 1),
            "train_accuracy": (correct / max(samples, 1)) if not use_mix else None,
            "lr": optimizer.param_groups[0]["lr"],
            "samples": int(samples),
            "samples_per_rank": samples_per_rank,
        }
        if (epoch + 1) % config.eval_every == 0 or epoch + 1 == total:
            last_eval = evaluate(model, eval_loader, device, amp_dtype, distributed=ctx.distributed)
            record["test_accuracy"] = last_eval["accuracy"]
            record["test_loss"] = last_eval["loss"]
        record["epoch_time_s"] = time.perf_counter() - t0
        history.append(record)
        unlogged.append(record)
        if ctx.is_main:
            if config.verbose:
                print(_epoch_line(record, total), flush=True)
        if (epoch + 1) % config.save_every == 0 or epoch + 1 == total:
            if ctx.is_main:
                metrics_so_far = {"history": history,
                                  "wall_time_s": wall_before + time.perf_counter() - t_start}
                atomic_save(checkpoint_dict(
                    model=model, dataset=setup.dataset, train_config=config.to_dict(),
                    optimizer=optimizer, scheduler=scheduler, scaler=scaler, epoch=epoch + 1,
                    metrics=metrics_so_far,
                    sampler=_sampler_state(train_loader, config, epoch + 1, ctx)),
                    os.path.join(out, CHECKPOINT_NAME))
                with open(log_path, "a") as f:
                    f.write("".join(json.dumps(r) + "\n" for r in unlogged))
            unlogged.clear()
            ctx.barrier()
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)

    if last_eval is None:  # resumed a finished run: evaluate the final model again
        last_eval = evaluate(model, eval_loader, device, amp_dtype, distributed=ctx.distributed)
    final_train = next((r for r in reversed(history) if "train_loss" in r), {})
    metrics = {
        "test_accuracy": last_eval["accuracy"],
        "test_loss": last_eval["loss"],
        "test_samples": last_eval["n"],
        "train_loss": final_train.get("train_loss"),
        "train_accuracy": final_train.get("train_accuracy"),
        "epochs": len(history),
        "model": setup.model_name,
        "model_config": plain(dict(getattr(unwrap(model), "config", {}))),
        "parameters": n_params,
        "dataset": config.dataset,
        "dataset_info": setup.dataset,
        "world_size": ctx.world_size,
        "device": str(device),
        "amp": str(amp_dtype).replace("torch.", "") if amp_dtype is not None else "off",
        "wall_time_s": wall_before + time.perf_counter() - t_start,
        "resumed_from_epoch": start_epoch if ckpt is not None else None,
        "config": plain(config.to_dict()),
        "checkpoint": os.path.join(out, CHECKPOINT_NAME),
        "history": history,
    }
    if ctx.is_main:
        atomic_write_text(json.dumps(metrics, indent=2) + "\n", os.path.join(out, METRICS_NAME))
        if config.verbose:
            print(f"done: test accuracy {metrics['test_accuracy']:.4f} after {metrics['epochs']} "
                  f"epochs in {metrics['wall_time_s']:.1f} s; wrote {os.path.join(out, METRICS_NAME)} "
                  f"and {os.path.join(out, CHECKPOINT_NAME)}", flush=True)
    ctx.barrier()
    return metrics


def _sampler_state(loader, config: TrainConfig, next_epoch: int, ctx: DistContext) -> Dict[str, Any]:
    """What the training loader's order depends on. The order of epoch e is a function of
    (seed, e) (``cctk.data.set_loader_epoch`` reseeds sampler and generator at each epoch
    start), so (seed, next_epoch) restores it; the generator state is kept for inspection."""
    gen = getattr(loader, "generator", None)
    return {"seed": config.seed, "epoch": next_epoch, "world_size": ctx.world_size,
            "sampler": type(getattr(loader, "sampler", None)).__name__,
            "generator_state": gen.get_state() if isinstance(gen, torch.Generator) else None}


def _epoch_line(r: Dict[str, Any], total: int) -> str:
    parts = [f"epoch {r['epoch']:>3}/{total}", f"train loss {r['train_loss']:.4f}"]
    if r.get("train_accuracy") is not None:
        parts.append(f"train acc {r['train_accuracy']:.4f}")
    if "test_accuracy" in r:
        parts.append(f"test acc {r['test_accuracy']:.4f}")
        parts.append(f"test loss {r['test_loss']:.4f}")
    parts.append(f"lr {r['lr']:.2e}")
    parts.append(f"{r['epoch_time_s']:.1f} s")
    return "  ".join(parts)


def _restore_scheduler(scheduler, optimizer, state: Dict[str, Any], config: TrainConfig) -> None:
    """Continue the schedule at the checkpoint's step count, with the shape (lr, epochs,
    warm-up, min_lr) of *this* run's config: identical when the config is unchanged, and a
    run extended with a larger --epochs gets the longer cosine instead of the old one."""
    fresh = scheduler.lr_lambdas[0]
    shape = dict(fresh.__dict__)          # load_state_dict overwrites the lambda's fields
    scheduler.load_state_dict(state)
    fresh.__dict__.update(shape)
    scheduler.base_lrs = [config.lr for _ in optimizer.param_groups]
    step = scheduler.last_epoch
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * fresh(step)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def read_resume_checkpoint(path: str) -> Dict[str, Any]:
    """The checkpoint a run continues from: a complete training checkpoint of ``cctk train``
    (a pruned one, or one without optimizer state, is refused with a ConfigError)."""
    ckpt = read_checkpoint(path, "cpu")
    if is_pruned_checkpoint(ckpt):
        raise ConfigError(f"cannot resume training from {path}: it is a pruned checkpoint; "
                          f"fine-tune it with `cctk prune --finetune-epochs N`, or resume the "
                          f"dense run's checkpoint.pt")
    missing = [k for k in ("train_config", "optimizer", "scheduler", "rng", "epoch")
               if ckpt.get(k) is None]
    if missing or not isinstance(ckpt.get("train_config"), dict):
        raise ConfigError(f"cannot resume training from {path}: it holds no training state "
                          f"({', '.join(missing) or 'train_config'} missing); start a new run")
    return ckpt


def _check_resumable(ckpt: Dict[str, Any], setup: Setup, path: str,
                     config: Optional[TrainConfig] = None) -> None:
    if config is not None:
        changed = resume_changes(ckpt["train_config"], config)
        if changed:
            old = TrainConfig.from_dict(ckpt["train_config"])
            what = ", ".join(f"{k} {getattr(old, k)!r} -> {getattr(config, k)!r}" for k in changed)
            raise ConfigError(f"cannot resume from {path} with other settings ({what}): they change what "
                              f"the run is; resume with the run's own settings, or start a new run "
                              f"(another --out, or --overwrite)")
    have = ckpt.get("model_config", {}).get("name")
    if have is not None and have != setup.model_name:
        raise ConfigError(f"cannot resume from {path}: it holds model {have!r}, this run builds "
                          f"{setup.model_name!r}")
    ds = ckpt.get("dataset", {}).get("name")
    if ds is not None and ds != setup.dataset["name"]:
        raise ConfigError(f"cannot resume from {path}: it was trained on {ds!r}, this run uses "
                          f"{setup.dataset['name']!r}")
