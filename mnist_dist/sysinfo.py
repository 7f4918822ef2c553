"""Facts about this machine, read without torch: CPU model and flags, cores, native bf16, library versions."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from functools import lru_cache
from pathlib import Path


def cpu_model() -> str:
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpuinfo_field(name: str) -> str:
    """The first ``name: value`` line of /proc/cpuinfo (Linux), else ''."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == name:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset:
    """The CPU's feature flags as the kernel lists them (x86 ``flags``, Arm ``Features``)."""
    return frozenset((cpuinfo_field("flags") or cpuinfo_field("Features")).split())


@lru_cache(maxsize=1)
def native_cpu_bf16() -> bool:
    """True where the CPU computes bf16 in hardware: AVX-512 BF16 or AMX on x86, the BF16 extension on Arm.

    oneDNN and OpenVINO also run bf16 on plain AVX-512 by emulation, and bf16 is then slower than fp32
    (15x slower was measured for training on an AVX2 CPU), so emulation does not count.
    """
    flags = cpu_flags()
    if flags:
        return bool({"avx512_bf16", "amx_bf16", "bf16"} & flags)
    if sys.platform == "darwin":  # Apple silicon from M2 on
        try:
            probe = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                                   timeout=5, check=False)
        except (OSError, subprocess.SubprocessError):
            return False
        return probe.stdout.strip() == "1"
    return False


@lru_cache(maxsize=1)
def physical_cores() -> int:
    """Physical cores this process may run on: the one CPU count every default here is derived from.

    Hyper-threads of one core share its arithmetic units, so they count once (Linux's topology files say
    which CPUs are siblings); elsewhere, every CPU counts.
    """
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in allowed:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def machine() -> dict:
    """The machine a benchmark ran on; torch's view of it where torch is installed."""
    info = {"cpu": cpu_model(), "cores": physical_cores(), "platform": platform.platform(),
            "python": platform.python_version(), "native_bf16": native_cpu_bf16()}
    try:
        import torch
    except ImportError:
        return info
    info.update(torch_threads=torch.get_num_threads(), cpu_capability=torch.backends.cpu.get_cpu_capability())
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
    return info


def versions(*names: str) -> dict:
    from importlib import metadata

    found: dict = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found
