"""What every job needs from its launcher: processes, threads, mixed precision, trackers, a progress bar.

Jobs run under ``python``, ``accelerate launch`` (which starts torchrun), or an
MPI launcher. Rank and world size are read the way Accelerate reads them, so
the same code sees the same numbers under each.

Importing this module imports neither torch nor accelerate: a one-process
inference job runs without them (``OneProcess``), and only the functions that
start an Accelerator or set torch's threads load them.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager, suppress

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


def make_accelerator(mixed_precision: str = "no", cpu: bool = False, log_with=None, project_dir=None):
    """An Accelerator that works the same under python, accelerate launch, torchrun, MPI, gloo and NCCL."""
    extras.require("train", "a job of several processes or on torch")
    import torch
    from accelerate import Accelerator

    world_size = launched_world_size()
    # Several processes without CUDA must talk over gloo on the CPU; without cpu=True
    # Accelerate would silently start unconnected copies that each train alone.
    cpu = cpu or (world_size > 1 and not torch.cuda.is_available())
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


# --- Interruption: a job stops cleanly on a signal, and dies with its launcher ---

GRACE_S = 1.5  # after a stop signal, the most a process takes to clean up before the kernel ends it
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class JobInterrupted(BaseException):
    """A stop signal arrived. A BaseException, as KeyboardInterrupt is: no ``except Exception`` swallows it, and
    every ``finally`` on the way out runs (temporary files removed, locks released)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def under_launcher() -> bool:
    """Started by `accelerate launch` (one process, or torchrun for several) or another launcher, rather than by
    a shell."""
    return (under_accelerate_launch() or "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ
            or launched_world_size() > 1)


def die_with_launcher() -> None:
    """End this process (SIGTERM) when the process that started it dies, even by SIGKILL.

    torchrun starts each worker in a session of its own, so nothing else ties it to the launcher: a killed
    launcher would leave its workers running. On Linux the kernel sends the signal (PR_SET_PDEATHSIG); the
    parent is checked once more after asking, in case it died first. Elsewhere a thread watches the parent.
    """
    parent = os.getppid()
    if not ask_kernel_for_parent_death_signal():
        threading.Thread(target=watch_parent, args=(parent,), daemon=True, name="watch-launcher").start()
    if os.getppid() != parent:  # the launcher died between the two reads: the kernel will send nothing
        os.kill(os.getpid(), signal.SIGTERM)


def ask_kernel_for_parent_death_signal() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def watch_parent(parent: int, every_s: float = 0.5) -> None:
    while os.getppid() == parent:
        time.sleep(every_s)
    os.kill(os.getpid(), signal.SIGTERM)


@contextmanager
def interruptible(resume_hint: str):
    """Run a job so that SIGTERM or SIGINT (and, under a launcher, the launcher's death) stops it cleanly.

    The signal becomes JobInterrupted in the main thread; the way out removes temporary files and releases
    locks; the main process then says how to resume, and the process exits with 128 + the signal's number.
    A main thread blocked in a collective whose peer is gone runs no Python at all: a thread woken by the
    signal itself ends the process GRACE_S later if it is still there.
    """
    stops = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.signal(s, raise_interrupted) for s in stops}
    previous_wakeup, sockets = arm_deadline()
    try:
        if under_launcher():
            die_with_launcher()
        yield
    except JobInterrupted as stop:
        # The signal may land inside any constructor (tqdm's, say); the half-built object's finaliser then fails
        # when it is freed on the way out, which would print a traceback that says nothing about this stop.
        sys.unraisablehook = ignore_unraisable
        if launched_rank() == 0:
            say(f"Interrupted by {signal.Signals(stop.signum).name}: {resume_hint}")
        raise SystemExit(128 + stop.signum) from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        signal.set_wakeup_fd(previous_wakeup)
        sockets[0].shutdown(socket.SHUT_RDWR)  # wakes the deadline thread, which then ends
        for sock in sockets:
            sock.close()


def ignore_unraisable(unraisable) -> None:
    pass


def raise_interrupted(signum, frame):
    for s in (signal.SIGTERM, signal.SIGINT):  # one stop is enough: a second signal must not cut the clean-up short
        signal.signal(s, signal.SIG_IGN)
    raise JobInterrupted(signum)


def arm_deadline() -> tuple:
    """Start a thread that ends the process GRACE_S after a stop signal arrives. Python's C-level handler writes
    the signal's number to the wake-up socket at once, even while the main thread is blocked in C++.
    Returns (the previous wake-up fd, the two sockets to close afterwards)."""
    woken, wake = socket.socketpair()
    wake.setblocking(False)
    previous = signal.set_wakeup_fd(wake.fileno(), warn_on_full_buffer=False)
    threading.Thread(target=deadline, args=(woken,), daemon=True, name="stop-deadline").start()
    return previous, (woken, wake)


def deadline(woken: socket.socket) -> None:
    while True:
        try:
            received = woken.recv(1)
        except OSError:
            return
        if not received:  # shut down: the job is over
            return
        if received[0] in (signal.SIGTERM, signal.SIGINT):
            time.sleep(GRACE_S)
            os._exit(128 + received[0])


def say(text: str) -> None:
    """One line on stderr, which may be a pipe to a launcher that is gone."""
    with suppress(OSError):
        print(text, file=sys.stderr, flush=True)


def agree(accelerator, prepare) -> list:
    """Run ``prepare`` on every process and return every process's result, in rank order.

    If it raises a UserError on any process, every process raises one (the main process's error, else the
    first other process's, named by rank): all stop together, before any of them starts work that would
    leave the others waiting at a collective until it times out."""
    result, error = None, None
    try:
        result = prepare()
    except UserError as e:
        error = str(e)
    every = [(error, result)]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        every = gather_object(every)
    for rank, (failure, _) in enumerate(every):
        if failure:
            raise UserError(failure if rank == 0 else f"process {rank}: {failure}")
    return [value for _, value in every]


def on_main_process(accelerator, check) -> None:
    """Run ``check`` on the main process alone; a UserError it raises is raised on every process, so that all
    of them stop together instead of waiting for the main one at the next collective."""
    error = None
    if accelerator.is_main_process:
        try:
            check()
        except UserError as e:
            error = str(e)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [error]
        broadcast_object_list(box)
        error = box[0]
    if error:
        raise UserError(error)
