"""What every job needs from its launcher: processes, threads, mixed precision, trackers, a progress bar.

Stopping on a signal is in ``interrupt``, decisions all processes share in ``collective``.

Jobs run under ``python``, ``accelerate launch`` (which starts torchrun), or an
MPI launcher. Rank and world size are read the way Accelerate reads them, so
the same code sees the same numbers under each.

Importing this module imports neither torch nor accelerate: a one-process
inference job runs without them (``OneProcess``), and only the functions that
start an Accelerator or set torch's threads load them.
"""
from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm

from . import extras
from .errors import UserError
from .sysinfo import native_cpu_bf16, physical_cores

# Accelerate's own lists of the variables each launcher (torchrun, Intel MPI / MPICH, Open MPI, MVAPICH) sets.
WORLD_SIZE_ENV = ["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"]
RANK_ENV = ["RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"]
LOCAL_SIZE_ENV = ["LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE"]
# `accelerate launch` always exports this (its --mixed_precision, or `accelerate config`'s, else "no").
LAUNCHER_PRECISION_ENV = "ACCELERATE_MIXED_PRECISION"
TRACKERS = ("none", "tensorboard", "mlflow", "wandb", "all")


def env_int(names: list, default: int) -> int:
    for name in names:
        value = os.environ.get(name, "")
        if value.strip().lstrip("-").isdigit():
            return int(value)
    return default


def launched_world_size() -> int:
    return env_int(WORLD_SIZE_ENV, 1)


def launched_rank() -> int:
    """This process's global rank as the launcher numbered it; 0 when not launched."""
    return env_int(RANK_ENV, 0)


def local_processes() -> int:
    return max(1, env_int(LOCAL_SIZE_ENV, 1))


def under_accelerate_launch() -> bool:
    return LAUNCHER_PRECISION_ENV in os.environ


def choose_threads(requested=None) -> tuple:
    """(intra-op threads per process, why). ``--threads`` wins; then $OMP_NUM_THREADS, except the 1 that
    ``accelerate launch`` exports whenever --num_cpu_threads_per_process is not given: that silent default
    would train a CPU job on one core, so only values above 1 count as chosen under the launcher; last,
    physical cores / processes on this machine."""
    if requested:
        return requested, "--threads"
    omp = env_int(["OMP_NUM_THREADS"], 0)
    if omp > 1 or (omp == 1 and not under_accelerate_launch()):
        return omp, "OMP_NUM_THREADS"
    cores, local = physical_cores(), local_processes()
    return max(1, cores // local), f"{cores} physical cores / {local} local process(es)"


def apply_threads(requested=None) -> tuple:
    """choose_threads, applied to torch's intra-op pool."""
    import torch

    threads, why = choose_threads(requested)
    torch.set_num_threads(threads)
    return threads, why


def cpu_asked(cpu: bool = False) -> bool:
    return cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


def will_use_cpu(cpu: bool = False) -> bool:
    """The device Accelerate will pick: CUDA, then mps, else the CPU (or the CPU when asked)."""
    import torch

    return cpu_asked(cpu) or not (torch.cuda.is_available() or torch.backends.mps.is_available())


def choose_mixed_precision(job_value, recipe_value: str, cpu: bool = False) -> tuple:
    """(precision, chosen by): the job's --mixed-precision, then the launcher's (its flag or `accelerate
    config`; its "no" is only the default it always exports), then the recipe's. 'auto' resolves here."""
    launcher = os.environ.get(LAUNCHER_PRECISION_ENV, "no").lower()
    if job_value is not None:
        value, chosen_by = job_value, "--mixed-precision"
    elif launcher != "no":
        value, chosen_by = launcher, "accelerate launch"
    else:
        value, chosen_by = recipe_value, "recipe"
    on_cpu = will_use_cpu(cpu)
    value = resolve_auto(value, on_cpu)
    if value not in ("no", "bf16", "fp16"):
        raise UserError(f"mixed precision {value!r} ({chosen_by}) is not supported here; use no, bf16 or fp16")
    if value == "fp16" and on_cpu:
        raise UserError(f"fp16 mixed precision ({chosen_by}) needs a GPU: on a CPU Accelerate would silently train "
                        "in fp32. Use --mixed-precision bf16 or no")
    return value, chosen_by


def resolve_auto(requested: str, on_cpu: bool) -> str:
    """'auto' is bf16 only where it pays for this small CNN: CPUs with native bf16 (AMX, AVX-512 BF16),
    where the convolutions are compute-bound. On an H100 a step is launch-bound and autocast's extra casts
    made 2 epochs 22% slower (4.0 s against 3.3 s), so GPUs, mps and other CPUs stay in fp32."""
    if requested != "auto":
        return requested
    return "bf16" if on_cpu and native_cpu_bf16() else "no"


def check_trackers(report_to: str) -> list:
    """Accelerate ``log_with`` values for --report-to, refusing a tracker whose package is missing."""
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available(), "mlflow": is_mlflow_available(),
                 "wandb": is_wandb_available()}
    if report_to == "none":
        return []
    if report_to == "all":
        found = [name for name, ok in available.items() if ok]
        if not found:
            raise UserError("--report-to all: none of tensorboard, mlflow, wandb is installed "
                            "(pip install tensorboard)")
        return found
    if report_to not in available:
        raise UserError(f"--report-to must be one of {', '.join(TRACKERS)}, got {report_to!r}")
    if not available[report_to]:
        raise UserError(f"--report-to {report_to}: the {report_to} package is not installed (pip install {report_to})")
    return [report_to]


def restart_count() -> int:
    """How many times torchrun has restarted the job's processes (``--max_restarts``); 0 on the first attempt."""
    return env_int(["TORCHELASTIC_RESTART_COUNT"], 0)


def join_restarted_group(cpu: bool) -> None:
    """Start the process group of a restarted attempt in a namespace of its own.

    torchrun's static rendezvous (the one `accelerate launch` uses) keeps one store for the whole launch, and the
    process group's keys from the attempt that died, each rank's gloo address among them, are still there when
    the restarted processes look for each other: a rank could read a dead peer's address, fail to connect ("Gloo
    connectFullMesh failed ... Connection refused") and use up a restart. Keys under the restart count start
    clean. Accelerate takes over a process group that is already started."""
    import torch
    import torch.distributed as dist

    if restart_count() == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or dist.is_initialized():
        return
    if not cpu:
        torch.cuda.set_device(env_int(["LOCAL_RANK"], 0))
    launch_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    attempts_own = dist.PrefixStore(f"mnist-dist/attempt-{restart_count()}", launch_store)
    dist.init_process_group("gloo" if cpu else "nccl", store=attempts_own, rank=launched_rank(),
                            world_size=launched_world_size())


def make_accelerator(mixed_precision: str = "no", cpu: bool = False, log_with=None, project_dir=None):
    """An Accelerator that works the same under python, accelerate launch, torchrun, MPI, gloo and NCCL."""
    extras.require("train", "a job of several processes or on torch")
    import torch
    from accelerate import Accelerator

    world_size = launched_world_size()
    # Several processes without CUDA must talk over gloo on the CPU; without cpu=True
    # Accelerate would silently start unconnected copies that each train alone.
    cpu = cpu or (world_size > 1 and not torch.cuda.is_available())
    if world_size > 1:
        join_restarted_group(cpu_asked(cpu))
    try:
        accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision, log_with=log_with or None,
                                  project_dir=str(project_dir) if project_dir else None)
    except ValueError as e:  # e.g. fp16 asked for on a device without fp16 support
        raise UserError(f"cannot start with mixed precision {mixed_precision}: {e}") from e
    if world_size > 1 and accelerator.num_processes == 1:
        raise UserError(f"{world_size} processes were launched but they did not join one process group")
    return accelerator


class OneProcess:
    """What a job asks of an Accelerator, for a job of one process that needs no torch (an ONNX predict):
    starting Accelerate would import torch and cost a second and hundreds of MB for nothing."""

    num_processes = 1
    process_index = 0
    is_main_process = True

    def __init__(self, device: str = "cpu"):
        self.device = device

    def wait_for_everyone(self) -> None:
        pass

    def end_training(self) -> None:
        pass


def job_processes(cpu: bool, needs_torch: bool):
    """An Accelerator where the job really has several processes or runs a torch model, else OneProcess."""
    if needs_torch or launched_world_size() > 1:
        return make_accelerator(cpu=cpu)
    return OneProcess(onnx_device(cpu))


def onnx_device(cpu: bool = False) -> str:
    """The GPU of this process where onnxruntime has its CUDA provider and the CPU was not asked for."""
    import onnxruntime as ort

    if cpu_asked(cpu) or "CUDAExecutionProvider" not in ort.get_available_providers():
        return "cpu"
    return f"cuda:{env_int(['LOCAL_RANK'], 0)}"


def progress_bar(total: int, desc: str, enabled: bool = True):
    """tqdm on the main process; redraws rarely when the output is a log file, not a terminal."""
    interactive = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, mininterval=0.1 if interactive else 10)
