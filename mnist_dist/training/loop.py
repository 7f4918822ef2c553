"""The training job: Accelerate-driven, sharded, evaluated on all 10,000 test images, resumable.

Launch it with ``accelerate launch jobs/train.py`` (any number of processes or
machines) or plain ``python jobs/train.py``. Checkpoints are epoch-granular:
``--resume latest`` continues after the last finished epoch.
"""
import copy
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from .. import atomic, collective, launch, locks
from ..data import batches, mnist
from ..errors import UserError
from ..model import CNN, count_parameters
from ..reports import plots, report
from . import checkpoint
from .augment import random_affine
from .config import TrainConfig
from .evaluate import evaluate

METRICS_JSONL = "metrics.jsonl"
METRICS_JSON = "metrics.json"
STEPS_JSONL = "steps.jsonl"
CONFIG_JSON = "config.json"
TRACKER_PROJECT = "mnist-dist"
TRAIN_IMAGES = mnist.SPLITS["train"][2]


@dataclass
class Setup:
    """What the launcher and this machine decided, beside the recipe: printed, and kept in config.json."""

    threads: int
    threads_chosen_by: str
    mixed_precision_chosen_by: str
    data_source: mnist.Source
    trackers: list


@dataclass
class Parts:
    """What trains: the prepared model, optimizer and loaders, the schedule, and the weight average if any."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: batches.ShardedBatches
    test_loader: torch.utils.data.DataLoader
    ema: Optional[AveragedModel] = None

    def evaluated_model(self) -> torch.nn.Module:
        """The model that is evaluated, checkpointed as ``model`` and exported: the average when there is one."""
        return self.ema.module if self.ema is not None else self.model


@dataclass
class History:
    """Everything a resumed run carries on from its checkpoint."""

    epochs: list = field(default_factory=list)  # one row per finished epoch (metrics.jsonl)
    steps: list = field(default_factory=list)  # one row per --metrics-every steps (steps.jsonl)
    wall_s: float = 0.0  # training seconds so far, evaluation excluded
    last_epoch: int = 0


def continue_after_restart(cfg: TrainConfig) -> None:
    """A group that torchrun restarted (``--max_restarts``) continues the run its dead attempt was writing, from
    the latest checkpoint, whatever the command said about resuming: the first attempt checked the folder before
    it wrote there. Without a checkpoint yet, it starts as the first attempt did."""
    if launch.restart_count() > 0 and checkpoint.list_checkpoints(Path(cfg.output_dir)):
        cfg.resume, cfg.overwrite = "latest", False


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


def steps_per_epoch(batch_size: int, processes: int, limit_batches=None) -> int:
    full = batches.global_batches(TRAIN_IMAGES, batch_size, processes)
    return min(full, limit_batches or full)


def check_same_steps(cfg: TrainConfig, state: dict, processes: int) -> None:
    """A one-cycle schedule is planned in optimizer steps: a resumed run must take as many per epoch."""
    if cfg.schedule != "onecycle":
        return
    planned = state["train_config"]
    before = state.get("steps_per_epoch") or steps_per_epoch(planned["batch_size"], state["processes"],
                                                             planned.get("limit_batches"))
    assert cfg.batch_size is not None  # the recipe is filled before any check
    now = steps_per_epoch(cfg.batch_size, processes, cfg.limit_batches)
    if before != now:
        raise UserError(
            f"{state['path']} was trained with {before} steps per epoch ({planned['batch_size']} per process x "
            f"{state['processes']} processes) and this launch would take {now} ({cfg.batch_size} x {processes}): "
            f"its onecycle schedule cannot continue. Resume with a global batch of "
            f"{planned['batch_size'] * state['processes']}")


def check_output_dir(cfg: TrainConfig, resume_state) -> None:
    """Refuse to clobber an earlier run (checked under the folder's lock: the run there has ended): a fresh run, or
    one resumed from another folder's checkpoint, would overwrite its metrics and mix its checkpoints."""
    out = Path(cfg.output_dir)
    holds_run = bool(checkpoint.list_checkpoints(out)) or (out / METRICS_JSONL).exists()
    if not holds_run or cfg.overwrite:
        return
    if resume_state is None:
        raise UserError(f"{out} already holds a training run; pass --resume latest to continue it or --overwrite")
    if not resumes_own_run(out, resume_state):
        raise UserError(f"{out} holds another training run than {resume_state['path']}; resuming there would "
                        f"overwrite its metrics and mix its checkpoints: choose an empty --output-dir, or --overwrite")


def resumes_own_run(out: Path, resume_state: dict) -> bool:
    """Whether the checkpoint being resumed is one of this folder's own."""
    return Path(resume_state["path"]).resolve().parent == (out / checkpoint.CHECKPOINT_DIR).resolve()


def prepare(cfg: TrainConfig, resume_state) -> Setup:
    """Settle the recipe and what the launcher asked for; every check here runs before any work."""
    job_precision = cfg.mixed_precision
    # Options not given on the command line continue the resumed run's recipe.
    cfg.fill_recipe(resume_state["train_config"] if resume_state else None).validate()
    assert cfg.mixed_precision is not None  # fill_recipe set it
    if resume_state is not None:
        check_resumable(cfg, resume_state)
    cfg.mixed_precision, precision_by = launch.choose_mixed_precision(job_precision, cfg.mixed_precision, cfg.cpu)
    trackers = launch.check_trackers(cfg.report_to)
    threads, threads_by = launch.apply_threads(cfg.threads)
    return Setup(threads, threads_by, precision_by, mnist.find_source(cfg.data_dir), trackers)


def load_data(cfg: TrainConfig, source: mnist.Source, device) -> tuple:
    train_set = batches.TensorBatches(*mnist.load_split("train", download=cfg.download, source=source))
    test_set = batches.TensorBatches(*mnist.load_split("test", download=cfg.download, source=source))
    if device.type != "cpu":  # keep the whole dataset resident: no host-to-device copy per batch
        train_set, test_set = train_set.to(device), test_set.to(device)
    return train_set, test_set


def describe_setup(accelerator, cfg, setup: Setup, model, train_set, test_set) -> None:
    say = accelerator.print
    say(f"Training images: {len(train_set)}, test images: {len(test_set)}")
    say(f"Data: {setup.data_source.describe()}")
    say(f"Using {accelerator.device.type} device, {accelerator.num_processes} process(es), "
        f"mixed precision {accelerator.mixed_precision} ({setup.mixed_precision_chosen_by}), "
        f"{setup.threads} thread(s) per process ({setup.threads_chosen_by})")
    say(f"Global batch: {cfg.batch_size} per process x {accelerator.num_processes} = "
        f"{cfg.batch_size * accelerator.num_processes}")
    schedule = f"onecycle (warm-up {cfg.warmup:g})" if cfg.schedule == "onecycle" else cfg.schedule
    ema = f"EMA {cfg.ema:g}" if cfg.ema else "EMA off"
    epochs = f"{cfg.epochs} epoch" + ("s" if cfg.epochs != 1 else "")
    say(f"Recipe ({cfg.preset}): {epochs}, Adam lr {cfg.lr:g} {schedule}, label smoothing "
        f"{cfg.label_smoothing:g}, augmentation {'on' if cfg.augment else 'off'}, {ema}, "
        f"channels_last {'on' if cfg.channels_last else 'off'}, seed {cfg.seed}")
    if setup.trackers:
        say(f"Tracking: {', '.join(setup.trackers)} in {cfg.output_dir}")
    say(model)
    say(f"Parameters: {count_parameters(model):,}")


def make_scheduler(cfg, optimizer, steps: int):
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps,
                                                   pct_start=cfg.warmup)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def train_one_epoch(accelerator, cfg, parts: Parts, epoch: int) -> tuple:
    """One pass over this process's shard.

    Returns (mean train loss over all processes, images trained, step rows). Each step's loss stays
    on the device until the epoch ends, so recording it costs no synchronisation per step.
    """
    model, optimizer, scheduler, loader = parts.model, parts.optimizer, parts.scheduler, parts.train_loader
    model.train()
    total = min(len(loader), cfg.limit_batches or len(loader))
    losses = torch.zeros(total, device=accelerator.device)
    rates = []
    bar = launch.progress_bar(total, f"epoch {epoch}", accelerator.is_main_process)
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
        rates.append(scheduler.get_last_lr()[0])  # the rate this step uses
        optimizer.step()
        scheduler.step()
        if parts.ema is not None:
            parts.ema.update_parameters(accelerator.unwrap_model(model))
        losses[batch_num - 1] = loss.detach()
        bar.update()
        if batch_num % cfg.log_every == 0 and accelerator.is_main_process:
            # As the tutorial: the current batch's loss every log_every batches.
            tqdm.write(f"loss: {loss.item():>7f} [batch {batch_num:>4d}/{total}]")
    bar.close()
    losses = accelerator.reduce(losses, reduction="mean").cpu()  # every process ran `total` equal batches
    images = total * cfg.batch_size * accelerator.num_processes
    return losses.mean().item(), images, step_rows(losses, rates, epoch, total, cfg.metrics_every)


def step_rows(losses: torch.Tensor, rates: list, epoch: int, steps: int, every: int) -> list:
    """One row per ``every`` steps: the global step, the fractional epoch, the mean loss, the learning rate."""
    rows = []
    for start in range(0, steps, every):
        end = min(start + every, steps)
        rows.append({"step": (epoch - 1) * steps + end, "epoch": epoch - 1 + end / steps,
                     "loss": losses[start:end].mean().item(), "lr": rates[end - 1]})
    return rows


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


def save_epoch(out, accelerator, cfg, parts: Parts, history: History, steps: int) -> None:
    trained = accelerator.unwrap_model(parts.model)
    state = {
        "model": accelerator.unwrap_model(parts.evaluated_model()).state_dict(),
        "model_config": trained.config,
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "epoch": history.last_epoch,
        "wall_s": history.wall_s,
        "rng": checkpoint.rng_state(),
        "metrics": history.epochs,
        "steps": history.steps,
        "steps_per_epoch": steps,
        "train_config": cfg.to_dict(),
        "processes": accelerator.num_processes,
    }
    if parts.ema is not None:  # "model" holds the average, which is exported; training resumes from these
        state.update(train_model=trained.state_dict(), ema=parts.ema.state_dict())
    checkpoint.save(checkpoint.checkpoint_path(out, history.last_epoch), state)
    # The checkpoint lands first: metrics never mention an epoch that cannot be resumed.
    atomic.write_jsonl(out / STEPS_JSONL, history.steps)
    atomic.write_jsonl(out / METRICS_JSONL, history.epochs)


def restore(state, accelerator, parts: Parts) -> History:
    accelerator.unwrap_model(parts.model).load_state_dict(state.get("train_model", state["model"]))
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    if parts.ema is not None:
        parts.ema.load_state_dict(state["ema"])
    checkpoint.set_rng_state(state["rng"])
    return History(state["metrics"], state.get("steps", []), state["wall_s"], state["epoch"])


def run(cfg: TrainConfig) -> dict:
    """Train, evaluate and checkpoint every epoch; return the final metrics."""
    started = time.perf_counter()
    out = Path(cfg.output_dir)
    continue_after_restart(cfg)
    resume_state = load_resume_state(cfg)  # the CLI has already refused a folder in use (locks.check_free)
    setup = prepare(cfg, resume_state)
    atomic.check_folder_writable(out, "--output-dir")
    assert cfg.mixed_precision is not None  # prepare() resolved it
    accelerator = launch.make_accelerator(cfg.mixed_precision, cfg.cpu, setup.trackers, project_dir=out)
    try:
        with ExitStack() as held:
            # One run per folder, for the run's whole life, taken once the processes can agree on the answer.
            collective.on_main_process(accelerator, lambda: held.enter_context(
                locks.exclusive(out / locks.RUN_LOCK, f"--output-dir {out}")))
            check_output_dir(cfg, resume_state)
            return _run(cfg, setup, accelerator, resume_state, out, started)
    finally:
        accelerator.end_training()  # closes the trackers and tears the process group down; gloo aborts otherwise


def _run(cfg, setup: Setup, accelerator, resume_state, out: Path, started: float) -> dict:
    from accelerate.utils import set_seed

    if resume_state is not None:
        check_same_steps(cfg, resume_state, accelerator.num_processes)
    set_seed(cfg.seed)
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels once
    data_started = time.perf_counter()
    with accelerator.local_main_process_first():  # one download per machine, if one is needed
        train_set, test_set = load_data(cfg, setup.data_source, accelerator.device)
    timings = {"data_load_s": time.perf_counter() - data_started}
    accelerator.wait_for_everyone()  # every process has passed every check before the first write

    steps = steps_per_epoch(cfg.batch_size, accelerator.num_processes, cfg.limit_batches)
    parts = build(cfg, accelerator, train_set, test_set, steps)
    describe_setup(accelerator, cfg, setup, accelerator.unwrap_model(parts.model), train_set, test_set)
    history = History()
    if resume_state is not None:
        history = restore(resume_state, accelerator, parts)
        accelerator.print(f"Resuming from {resume_state['path']} after epoch {history.last_epoch}")
    record = run_record(cfg, setup, accelerator)
    if accelerator.is_main_process:
        # Starting afresh (--overwrite included): no checkpoint of an earlier run may pass for this one's.
        start_output_dir(out, record, fresh=resume_state is None or not resumes_own_run(out, resume_state))
    if setup.trackers:
        accelerator.init_trackers(TRACKER_PROJECT, config=tracker_config(record))
    run_number = 1 + max((row.get("run", 1) for row in history.epochs), default=0)
    warm_up(accelerator, cfg, parts.model, train_set, test_set)
    timings["startup_s"] = time.perf_counter() - started  # everything before the first epoch, data included

    for epoch in range(history.last_epoch + 1, cfg.epochs + 1):
        accelerator.print(f"Epoch {epoch}\n--------------------")
        parts.train_loader.set_epoch(epoch)
        synchronize(accelerator.device)
        t0 = time.perf_counter()
        train_loss, images, rows = train_one_epoch(accelerator, cfg, parts, epoch)
        synchronize(accelerator.device)
        epoch_s = time.perf_counter() - t0
        history.wall_s += epoch_s
        history.last_epoch = epoch
        history.steps += rows
        metrics = evaluate(parts.evaluated_model(), parts.test_loader, accelerator.gather_for_metrics)
        history.epochs.append({"epoch": epoch, "run": run_number, "train_loss": train_loss, **metrics,
                               "train_images": images, "images_per_s": images / epoch_s, "epoch_s": epoch_s,
                               "wall_s": history.wall_s})
        print_epoch(accelerator, history.epochs[-1])
        log_to_trackers(accelerator, rows, history.epochs[-1], epoch * steps)
        if accelerator.is_main_process:
            save_epoch(out, accelerator, cfg, parts, history, steps)
        accelerator.wait_for_everyone()
    return finish(out, accelerator, cfg, history, timings)


def build(cfg, accelerator, train_set, test_set, steps: int) -> Parts:
    """Model, optimizer and loaders, prepared by Accelerate; the LR scheduler and weight average beside them."""
    model = CNN()
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    train_loader = batches.ShardedBatches(train_set, cfg.batch_size, accelerator.num_processes,
                                          accelerator.process_index, cfg.seed)
    # Evaluation keeps Accelerate's loader: gather_for_metrics needs it to drop the last batch's padding.
    test_loader = batches.make_loader(test_set, cfg.eval_batch_size, shuffle=False)
    model, optimizer, test_loader = accelerator.prepare(model, optimizer, test_loader)
    # Stepped by hand once per optimizer step: Accelerate's wrapper would step it once per process.
    ema = None
    if cfg.ema:  # every process applies the same all-reduced steps, so every copy of the average is the same
        ema = AveragedModel(accelerator.unwrap_model(model), multi_avg_fn=get_ema_multi_avg_fn(cfg.ema))
    return Parts(model, optimizer, make_scheduler(cfg, optimizer, steps), train_loader, test_loader, ema)


def log_to_trackers(accelerator, step_rows_: list, epoch_row: dict, step: int) -> None:
    """Scalars for TensorBoard, MLflow or W&B (a no-op without --report-to); only the main process writes."""
    for row in step_rows_:
        accelerator.log({"train/loss": row["loss"], "train/lr": row["lr"]}, step=row["step"])
    accelerator.log({"test/accuracy": epoch_row["test_accuracy"], "test/loss": epoch_row["test_loss"],
                     "train/epoch_loss": epoch_row["train_loss"], "train/images_per_s": epoch_row["images_per_s"]},
                    step=step)


def start_output_dir(out: Path, record: dict, fresh: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if fresh:  # --overwrite, or another folder's checkpoint resumed here: old checkpoints are not this run's
        for old in checkpoint.list_checkpoints(out):
            old.unlink()
    # Temporary files of a write cut short by a hard kill: under the lock, no other writer owns them.
    for folder in (out, out / checkpoint.CHECKPOINT_DIR):
        atomic.remove_stale_temporaries(folder)
    atomic.write_json(out / CONFIG_JSON, record)


def finish(out: Path, accelerator, cfg, history: History, timings: dict) -> dict:
    final = {**history.epochs[-1], "processes": accelerator.num_processes,
             "global_batch": cfg.batch_size * accelerator.num_processes, **timings}
    if accelerator.is_main_process:
        atomic.write_json(out / METRICS_JSON, final)
        plots.training_curves(history.epochs, history.steps, out / report.CURVES, cfg.label_smoothing)
    accelerator.print("Done!")
    return final


def print_epoch(accelerator, row) -> None:
    accelerator.print(
        f"Test result: Accuracy: {100 * row['test_accuracy']:.2f}% ({row['test_correct']}/{row['test_samples']}), "
        f"Avg loss: {row['test_loss']:.6f} | train loss {row['train_loss']:.4f}, "
        f"{row['images_per_s']:.0f} images/s, {row['epoch_s']:.1f} s"
    )


def run_record(cfg, setup: Setup, accelerator) -> dict:
    """The resolved config, with what the launcher and this machine decided."""
    import accelerate

    return {
        **cfg.to_dict(),
        "data_source": setup.data_source.record(),
        "threads": setup.threads,
        "threads_chosen_by": setup.threads_chosen_by,
        "mixed_precision_chosen_by": setup.mixed_precision_chosen_by,
        "trackers": setup.trackers,
        "processes": accelerator.num_processes,
        "global_batch": cfg.batch_size * accelerator.num_processes,
        "device": accelerator.device.type,
        "versions": {"torch": torch.__version__, "accelerate": accelerate.__version__},
    }


def tracker_config(record: dict) -> dict:
    """The run record flattened to the scalars every tracker accepts (TensorBoard's hparams take no None)."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update({f"{key}/{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}
