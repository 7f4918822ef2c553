"""The training job: Accelerate-driven, sharded, evaluated on all 10,000 test images, resumable.

Launch it with ``accelerate launch jobs/train.py`` (any number of processes or
machines) or plain ``python jobs/train.py``. Checkpoints are epoch-granular:
``--resume latest`` continues after the last finished epoch.
"""
import copy
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import atomic, data
from ..errors import UserError
from ..launch import make_accelerator, progress_bar, resolve_mixed_precision
from ..model import CNN, count_parameters
from ..reports import plots, report
from . import checkpoint
from .augment import random_affine
from .config import TrainConfig
from .evaluate import evaluate

METRICS_JSONL = "metrics.jsonl"
METRICS_JSON = "metrics.json"
CONFIG_JSON = "config.json"


def load_data(cfg: TrainConfig, device) -> tuple:
    root = data.resolve_data_dir(cfg.data_dir)
    train_set = data.TensorBatches(*data.load_split(root, "train", cfg.download))
    test_set = data.TensorBatches(*data.load_split(root, "test", cfg.download))
    if device.type != "cpu":  # keep the whole dataset resident: no host-to-device copy per batch
        train_set, test_set = train_set.to(device), test_set.to(device)
    return train_set, test_set


def load_resume_state(cfg: TrainConfig):
    if cfg.resume is None:
        return None
    path = checkpoint.latest_checkpoint(cfg.output_dir) if cfg.resume == "latest" else Path(cfg.resume)
    state = checkpoint.load(path)
    missing = [k for k in ("optimizer", "epoch", "rng", "metrics", "train_config") if k not in state]
    if missing:
        raise UserError(f"checkpoint {path} cannot resume training (missing {', '.join(missing)})")
    state["path"] = str(path)
    return state


def check_resumable(cfg: TrainConfig, state: dict) -> None:
    planned = state["train_config"]
    if planned["schedule"] == "onecycle" and cfg.schedule == "onecycle" and planned["epochs"] != cfg.epochs:
        raise UserError(f"{state['path']} follows a onecycle schedule planned for {planned['epochs']} epochs; "
                        f"resume it with --epochs {planned['epochs']}")


def check_output_dir(cfg: TrainConfig, resuming: bool) -> Path:
    """Refuse to clobber an earlier run, and prove the folder is writable, before writing anything."""
    out = Path(cfg.output_dir)
    holds_run = bool(checkpoint.list_checkpoints(out)) or (out / METRICS_JSONL).exists()
    if holds_run and not (resuming or cfg.overwrite):
        raise UserError(f"{out} already holds a training run; pass --resume latest to continue it or --overwrite")
    # Probe the deepest folder that exists, so a failed run leaves no empty output dir behind.
    existing = out.absolute()
    while not existing.exists():
        existing = existing.parent
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UserError(f"--output-dir {out} is not writable ({e.strerror or e})") from e
    return out


def describe_setup(accelerator, cfg, model, train_set, test_set) -> None:
    say = accelerator.print
    say(f"Training images: {len(train_set)}, test images: {len(test_set)}")
    say(f"Using {accelerator.device.type} device, {accelerator.num_processes} process(es), "
        f"mixed precision {accelerator.mixed_precision}")
    say(f"Global batch: {cfg.batch_size} per process x {accelerator.num_processes} = "
        f"{cfg.batch_size * accelerator.num_processes}")
    say(f"Recipe ({cfg.preset}): {cfg.epochs} epochs, Adam lr {cfg.lr:g} {cfg.schedule}, label smoothing "
        f"{cfg.label_smoothing:g}, augmentation {'on' if cfg.augment else 'off'}, "
        f"channels_last {'on' if cfg.channels_last else 'off'}")
    say(model)
    say(f"Parameters: {count_parameters(model):,}")


def make_scheduler(cfg, optimizer, steps_per_epoch: int):
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def train_one_epoch(accelerator, cfg, model, optimizer, scheduler, loader, epoch) -> tuple:
    """One pass over this process's shard; returns (mean train loss over all processes, images trained)."""
    model.train()
    loss_sum = torch.zeros((), device=accelerator.device)
    seen = torch.zeros((), device=accelerator.device)
    total = min(len(loader), cfg.limit_batches or len(loader))
    bar = progress_bar(total, f"epoch {epoch}", accelerator.is_main_process)
    augmentation = augmentation_generator(cfg, accelerator, epoch)
    for batch_num, (images, labels) in enumerate(loader, start=1):
        if batch_num > total:  # --limit-batches
            break
        if augmentation is not None:
            images = random_affine(images, augmentation)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(model(images), labels, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach() * len(labels)
        seen += len(labels)
        bar.update()
        if batch_num % cfg.log_every == 0 and accelerator.is_main_process:
            # As the tutorial: the current batch's loss every log_every batches.
            tqdm.write(f"loss: {loss.item():>7f} [batch {batch_num:>4d}/{total}]")
    bar.close()
    loss_sum, seen = accelerator.reduce(torch.stack([loss_sum, seen]), reduction="sum")
    return (loss_sum / seen).item(), int(seen.item())


def augmentation_generator(cfg, accelerator, epoch: int):
    """A generator seeded from (seed, epoch, process): each process draws its own transforms, and a
    run resumed at an epoch boundary draws exactly what an uninterrupted one would."""
    if not cfg.augment:
        return None
    generator = torch.Generator(device=accelerator.device)
    generator.manual_seed((cfg.seed * 100_003 + epoch) * 1_009 + accelerator.process_index)
    return generator


def warm_up(accelerator, cfg, model, train_set, test_set) -> None:
    """One training step and one evaluation batch on a throwaway copy of the model.

    On a GPU the first steps pay for the CUDA context, lazy kernel loading and
    cuDNN's autotuning: seconds, against about a second for a whole epoch. Paying
    them here books them as start-up, and leaves the real model, optimizer and
    random streams untouched.
    """
    if accelerator.device.type != "cuda":
        return
    scratch = copy.deepcopy(accelerator.unwrap_model(model)).train()
    optimizer = torch.optim.Adam(scratch.parameters(), lr=cfg.lr)
    images, labels = train_set.__getitems__(list(range(cfg.batch_size)))
    if cfg.augment:
        images = random_affine(images, torch.Generator(device=images.device).manual_seed(0))
    if cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with accelerator.autocast():
        F.cross_entropy(scratch(images), labels).backward()
    optimizer.step()
    with torch.no_grad(), accelerator.autocast():
        scratch.eval()(test_set.__getitems__(list(range(min(cfg.eval_batch_size, len(test_set)))))[0])
    synchronize(accelerator.device)


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def save_epoch(out, accelerator, model, optimizer, scheduler, cfg, epoch, wall_s, history) -> None:
    state = {
        "model": accelerator.unwrap_model(model).state_dict(),
        "model_config": accelerator.unwrap_model(model).config,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "wall_s": wall_s,
        "rng": checkpoint.rng_state(),
        "metrics": history,
        "train_config": cfg.to_dict(),
        "processes": accelerator.num_processes,
    }
    checkpoint.save(checkpoint.checkpoint_path(out, epoch), state)
    # The checkpoint lands first: metrics never mention an epoch that cannot be resumed.
    atomic.write_jsonl(out / METRICS_JSONL, history)


def restore(state, model, optimizer, scheduler) -> None:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    checkpoint.set_rng_state(state["rng"])


def run(cfg: TrainConfig) -> dict:
    """Train, evaluate and checkpoint every epoch; return the final metrics."""
    started = time.perf_counter()
    resume_state = load_resume_state(cfg)
    # Options not given on the command line continue the resumed run's recipe.
    cfg.fill_recipe(resume_state["train_config"] if resume_state else None).validate()
    if resume_state is not None:
        check_resumable(cfg, resume_state)
    cfg.mixed_precision = resolve_mixed_precision(cfg.mixed_precision, cfg.cpu)
    accelerator = make_accelerator(cfg.mixed_precision, cfg.cpu)
    try:
        return _run(cfg, accelerator, resume_state, started)
    finally:
        accelerator.end_training()  # tears the process group down cleanly; gloo aborts at exit otherwise


def _run(cfg, accelerator, resume_state, started: float) -> dict:
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels once
    out = check_output_dir(cfg, resuming=resume_state is not None)
    data_started = time.perf_counter()
    with accelerator.main_process_first():  # one download at a time, if one is needed
        train_set, test_set = load_data(cfg, accelerator.device)
    timings = {"data_load_s": time.perf_counter() - data_started}
    accelerator.wait_for_everyone()  # every process has passed every check before the first write

    model, optimizer, train_loader, test_loader, scheduler = build(cfg, accelerator, train_set, test_set)
    describe_setup(accelerator, cfg, accelerator.unwrap_model(model), train_set, test_set)
    start_epoch, wall_s, history = 0, 0.0, []
    if resume_state is not None:
        restore(resume_state, accelerator.unwrap_model(model), optimizer, scheduler)
        start_epoch, wall_s, history = resume_state["epoch"], resume_state["wall_s"], resume_state["metrics"]
        accelerator.print(f"Resuming from {resume_state['path']} after epoch {start_epoch}")
    if accelerator.is_main_process:
        start_output_dir(out, cfg, accelerator, fresh=resume_state is None)
    run_number = 1 + max((row.get("run", 1) for row in history), default=0)
    warm_up(accelerator, cfg, model, train_set, test_set)
    timings["startup_s"] = time.perf_counter() - started  # everything before the first epoch, data included

    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        accelerator.print(f"Epoch {epoch}\n--------------------")
        train_loader.set_epoch(epoch)
        synchronize(accelerator.device)
        t0 = time.perf_counter()
        train_loss, images = train_one_epoch(accelerator, cfg, model, optimizer, scheduler, train_loader, epoch)
        synchronize(accelerator.device)
        epoch_s = time.perf_counter() - t0
        wall_s += epoch_s
        metrics = evaluate(model, test_loader, accelerator.gather_for_metrics)
        history.append({"epoch": epoch, "run": run_number, "train_loss": train_loss, **metrics,
                        "train_images": images, "images_per_s": images / epoch_s, "epoch_s": epoch_s,
                        "wall_s": wall_s})
        print_epoch(accelerator, history[-1])
        if accelerator.is_main_process:
            save_epoch(out, accelerator, model, optimizer, scheduler, cfg, epoch, wall_s, history)
        accelerator.wait_for_everyone()
    return finish(out, cfg, accelerator, history, timings)


def build(cfg, accelerator, train_set, test_set) -> tuple:
    """Model, optimizer and loaders, prepared by Accelerate; the LR scheduler beside them."""
    model = CNN()
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    train_loader = data.ShardedBatches(train_set, cfg.batch_size, accelerator.num_processes,
                                       accelerator.process_index, cfg.seed)
    # Evaluation keeps Accelerate's loader: gather_for_metrics needs it to drop the last batch's padding.
    test_loader = data.make_loader(test_set, cfg.eval_batch_size, shuffle=False)
    model, optimizer, test_loader = accelerator.prepare(model, optimizer, test_loader)
    # Stepped by hand once per optimizer step: Accelerate's wrapper would step it once per process.
    steps_per_epoch = min(len(train_loader), cfg.limit_batches or len(train_loader))
    return model, optimizer, train_loader, test_loader, make_scheduler(cfg, optimizer, steps_per_epoch)


def start_output_dir(out: Path, cfg, accelerator, fresh: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if fresh:  # --overwrite: old checkpoints must not pass for this run's
        for old in checkpoint.list_checkpoints(out):
            old.unlink()
    atomic.write_json(out / CONFIG_JSON, run_record(cfg, accelerator))


def finish(out: Path, cfg, accelerator, history: list, timings: dict) -> dict:
    final = {**history[-1], "processes": accelerator.num_processes,
             "global_batch": cfg.batch_size * accelerator.num_processes, **timings}
    if accelerator.is_main_process:
        atomic.write_json(out / METRICS_JSON, final)
        plots.training_curves(history, out / report.CURVES)
    accelerator.print("Done!")
    return final


def print_epoch(accelerator, row) -> None:
    accelerator.print(
        f"Test result: Accuracy: {100 * row['test_accuracy']:.2f}% ({row['test_correct']}/{row['test_samples']}), "
        f"Avg loss: {row['test_loss']:.6f} | train loss {row['train_loss']:.4f}, "
        f"{row['images_per_s']:.0f} images/s, {row['epoch_s']:.1f} s"
    )


def run_record(cfg, accelerator) -> dict:
    """The resolved config, with what the launcher decided."""
    import accelerate

    return {
        **cfg.to_dict(),
        "data_dir": str(data.resolve_data_dir(cfg.data_dir)),
        "processes": accelerator.num_processes,
        "global_batch": cfg.batch_size * accelerator.num_processes,
        "device": accelerator.device.type,
        "versions": {"torch": torch.__version__, "accelerate": accelerate.__version__},
    }
