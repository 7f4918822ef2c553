"""Run an exported model (TorchScript, ONNX through onnxruntime, torch.export) or the eager reference.

Each loader returns a function: float32 numpy [N,1,28,28] -> float32 numpy logits [N,10].
"""
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError


@contextmanager
def quiet_torchscript():
    """torch >= 2.11 deprecates torch.jit with a FutureWarning on every call. TorchScript is still
    offered on purpose (C++ libtorch and older serving stacks load it), so the warning is silenced
    here, where we call it knowingly, and nowhere else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit\.")
        yield


def _torch_runner(module, device="cpu"):
    module = module.to(device)

    @torch.inference_mode()
    def run(images: np.ndarray) -> np.ndarray:
        return module(torch.from_numpy(images).to(device)).float().cpu().numpy()

    return run


def load_torchscript(path, device="cpu"):
    with quiet_torchscript():
        module = torch.jit.load(str(path), map_location="cpu").eval()
    return _torch_runner(module, device)


def load_pt2(path, device="cpu"):
    return _torch_runner(torch.export.load(str(path)).module(), device)


def load_reference(path, device="cpu"):
    from ..training.checkpoint import load_model

    model, _ = load_model(path)
    return _torch_runner(model, device)


def onnx_providers(device: str = "cpu") -> list:
    """onnxruntime's CUDA provider for a process on a GPU, where this onnxruntime build has it; else the CPU."""
    import onnxruntime as ort

    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        index = int(device.split(":")[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def onnx_session(path, threads=None, providers=None, spin: bool = True):
    """``spin=False`` stops idle worker threads from spinning between runs: a server's event loop and its other
    work need those cores more than the next small batch needs a head start."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only
    try:
        return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for unreadable models
        raise UserError(f"cannot load ONNX model {path}: {' '.join(str(e).split())[:300]}") from e


def onnx_runner(session):
    input_name = session.get_inputs()[0].name

    def run(images: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: images})[0]

    return run


def load_onnx(path, threads=None, providers=None):
    return onnx_runner(onnx_session(path, threads, providers))


ENGINES = ("onnxruntime", "openvino", "openvino-bf16")
RUNTIME_CHOICES = ("auto", *ENGINES)
AUTO_OPENVINO_FROM = 64  # images per batch; measured: below this onnxruntime answers sooner, above OpenVINO is faster


def choose_runtime(path, requested: str, batch: int, device: str = "cpu") -> tuple:
    """(engine, why) for an ONNX file. "auto" picks between onnxruntime and OpenVINO at the same precision as the
    file (bf16 is never chosen for the user: it changes the numbers); on a GPU process, onnxruntime.

    The rule: the model folder's bench.json (written by `mnist-dist bench` on this machine) names the faster of
    the two at the measured batch size closest to ``batch``; without one, OpenVINO from AUTO_OPENVINO_FROM images
    per batch, where it measured faster, and onnxruntime below, where it answered single images sooner.
    """
    if requested != "auto":
        return requested, ""
    if device.startswith("cuda") or not openvino_installed():
        return "onnxruntime", "auto"
    measured = fastest_in_bench(Path(path), batch)
    if measured:
        return measured
    return ("openvino" if batch >= AUTO_OPENVINO_FROM else "onnxruntime"), f"auto: batch {batch}"


def fastest_in_bench(path: Path, batch: int):
    import json

    bench = path.parent / "bench.json"
    if not bench.is_file():
        return None
    try:
        results = json.loads(bench.read_text())["results"]
    except (ValueError, KeyError):
        return None
    precision = "int8" if ".int8." in path.name else "fp32"
    rows = {(r["runtime"], r["batch"]): r["images_per_s"] for r in results}
    names = {"onnxruntime": f"onnxruntime-{precision}", "openvino": f"openvino-{precision}"}
    sizes = sorted({b for (name, b) in rows if name in names.values()}, key=lambda b: abs(np.log(b / batch)))
    for size in sizes:
        if all((name, size) in rows for name in names.values()):
            engine = max(names, key=lambda e: rows[names[e], size])
            return engine, f"auto: fastest at batch {size} in bench.json"
    return None


def openvino_installed() -> bool:
    from importlib.util import find_spec

    return find_spec("openvino") is not None


def openvino_core():
    try:
        import openvino
    except ImportError as e:
        raise UserError("the openvino runtime needs the openvino extra: pip install 'mnist-dist[openvino]'") from e
    return openvino.Core()


def openvino_bf16() -> bool:
    """bf16 in OpenVINO only where the CPU computes it natively (AVX-512 BF16, AMX): elsewhere it is emulated."""
    from ..launch import native_cpu_bf16

    return native_cpu_bf16() and "BF16" in openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def load_openvino(path, threads=None, precision: str = "fp32"):
    """An ONNX file compiled by OpenVINO for this CPU, batch dynamic; ``precision`` fp32 or bf16 (native only).

    Each thread gets its own infer request: one compiled model may serve concurrent callers, a request may not.
    """
    import threading

    core = openvino_core()
    if precision == "bf16" and not openvino_bf16():
        raise UserError("bf16 needs a CPU that computes it natively (AVX-512 BF16 or AMX); this one does not: "
                        "use openvino (fp32)")
    config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32", "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    try:
        compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    except Exception as e:  # OpenVINO raises RuntimeError subclasses of its own for unreadable models
        raise UserError(f"OpenVINO cannot load {path}: {' '.join(str(e).split())[:300]}") from e
    local = threading.local()

    def run(images: np.ndarray) -> np.ndarray:
        if not hasattr(local, "request"):
            local.request = compiled.create_infer_request()
        # The output tensor is the request's own memory, reused by its next call: copy it out.
        return np.array(local.request.infer({0: images})[0], copy=True)

    return run


TORCH_LOADERS = {".ts": load_torchscript, ".pt2": load_pt2, ".pt": load_reference}


def load_runner(path, device="cpu"):
    """A runner for any exported file: ONNX through onnxruntime (on the CPU), the others in PyTorch on ``device``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model {path} does not exist")
    if path.suffix == ".onnx":
        return load_onnx(path)
    loader = TORCH_LOADERS.get(path.suffix)
    if loader is None:
        raise UserError(f"{path}: unknown model type (expected one of .onnx, {', '.join(TORCH_LOADERS)})")
    return loader(path, device)


def run_batched(runner, images: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([runner(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
