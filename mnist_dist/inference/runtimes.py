"""The engines an ONNX file runs in: onnxruntime (CPU, or its CUDA provider) and OpenVINO, and the rule that
picks one. Torch-free: TorchScript and torch.export files run in ``torch_runtime``.

Each loader returns (run, declared input shape): run maps float32 numpy [N,1,28,28] to float32 logits [N,10];
the shape is the input as the engine reports it, a free dimension as a name or None.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from .. import extras, sysinfo
from ..errors import UserError, one_line
from ..sysinfo import native_cpu_bf16

ENGINES = ("onnxruntime", "openvino", "openvino-bf16")
RUNTIME_CHOICES = ("auto", *ENGINES)
AUTO_OPENVINO_FROM = 64  # images per batch; measured: below this onnxruntime answers sooner, above OpenVINO is faster


def cuda_provider_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def onnx_providers(device: str = "cpu") -> list:
    """onnxruntime's CUDA provider for a process on a GPU, where this onnxruntime build has it; else the CPU (a
    GPU process then runs the model on its CPU, and says so)."""
    if device.startswith("cuda") and cuda_provider_available():
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
        raise UserError(f"cannot load ONNX model {path}: {one_line(e)}") from e


def load_onnxruntime(path, threads=None, device: str = "cpu", spin: bool = True) -> tuple:
    """(run, input shape, description) of an ONNX file in onnxruntime."""
    session = onnx_session(path, threads, onnx_providers(device), spin)
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise UserError(f"{path} takes {len(inputs)} inputs; expected one image batch")
    name = inputs[0].name

    def run(images: np.ndarray) -> np.ndarray:
        return session.run(None, {name: images})[0]

    # What really runs: the first provider the session kept (CPU where the CUDA provider could not start).
    return run, list(inputs[0].shape), f"onnxruntime {session.get_providers()[0]}"


def choose_runtime(path, requested: str, batch: int, device: str = "cpu") -> tuple:
    """(engine, why) for an ONNX file. "auto" picks between onnxruntime and OpenVINO at the same precision as the
    file (bf16 is never chosen for the user: it changes the numbers); on a GPU process, onnxruntime.

    The rule: the model folder's bench.json (written by `mnist-dist bench` on this machine) names the faster of
    the two at the measured batch size closest to ``batch``; without one, see ``openvino_by_default``.
    """
    if requested != "auto":
        return requested, ""
    if device.startswith("cuda") and cuda_provider_available():
        return "onnxruntime", "auto: a GPU process"
    if not openvino_installed():
        return "onnxruntime", "auto"
    measured = fastest_in_bench(Path(path), batch)
    if measured:
        return measured
    return ("openvino" if openvino_by_default(Path(path), batch) else "onnxruntime"), f"auto: batch {batch}"


def openvino_by_default(path: Path, batch: int) -> bool:
    """Where nothing was measured beside the model: OpenVINO from AUTO_OPENVINO_FROM images per batch for INT8
    files, and for fp32 ones on AVX-512 CPUs; onnxruntime otherwise. Measured (benchmarks/inference-*.json):
    below that batch onnxruntime answers sooner everywhere; above it OpenVINO ran INT8 1.5-1.8x faster than
    onnxruntime on AVX2 and AVX-512 CPUs alike, and fp32 1.2-1.5x faster with AVX-512 but 0.7-0.8x without."""
    int8 = ".int8." in path.name
    return batch >= AUTO_OPENVINO_FROM and (int8 or "avx512f" in sysinfo.cpu_flags())


def fastest_in_bench(path: Path, batch: int):
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
    return not extras.missing("openvino")


def openvino_core():
    return extras.load("openvino", "openvino", "the openvino runtime").Core()


def openvino_bf16() -> bool:
    """bf16 in OpenVINO only where the CPU computes it natively (AVX-512 BF16, AMX): elsewhere it is emulated."""
    return native_cpu_bf16() and "BF16" in openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def load_openvino(path, threads=None, precision: str = "fp32") -> tuple:
    """(run, input shape, description) of an ONNX file compiled by OpenVINO for this CPU, batch dynamic;
    ``precision`` fp32 or bf16 (native only).

    Each thread gets its own infer request: one compiled model may serve concurrent callers, a request may not.
    """
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
        raise UserError(f"OpenVINO cannot load {path}: {one_line(e)}") from e
    if len(compiled.inputs) != 1:
        raise UserError(f"{path} takes {len(compiled.inputs)} inputs; expected one image batch")
    shape = [d.get_length() if d.is_static else None for d in compiled.inputs[0].get_partial_shape()]
    local = threading.local()

    def run(images: np.ndarray) -> np.ndarray:
        if not hasattr(local, "request"):
            local.request = compiled.create_infer_request()
        # The output tensor is the request's own memory, reused by its next call: copy it out.
        return np.array(local.request.infer({0: images})[0], copy=True)

    return run, shape, f"openvino CPU {precision}"


def load_engine(path, engine: str, threads=None, device: str = "cpu", spin: bool = True) -> tuple:
    """(run, input shape, description) of an ONNX file in ``engine`` (one of ENGINES)."""
    if engine == "onnxruntime":
        return load_onnxruntime(path, threads, device, spin)
    if engine in ("openvino", "openvino-bf16"):
        return load_openvino(path, threads, "bf16" if engine == "openvino-bf16" else "fp32")
    raise UserError(f"unknown runtime {engine!r}; choose from {', '.join(RUNTIME_CHOICES)}")


def run_batched(runner, images: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([runner(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
