"""The Open Inference Protocol ("v2", as KServe and Triton speak it) over REST: requests in, responses out.

Pure codec, no web framework: ``parse_infer`` turns a request body (JSON, or
JSON followed by binary tensors: Triton's binary tensor extension, announced
by the ``Inference-Header-Content-Length`` header) into the model's input
batch, and ``encode_infer`` writes the outputs the client asked for, each as
JSON ``data`` or as raw little-endian bytes after the JSON header.

The model's input is the tensor of its manifest: ``FP32 [-1, 1, 28, 28]``,
pixels already scaled as the manifest says (pixel / 255), white digit on
black. ``UINT8`` pixels 0..255 of the same shape are accepted too and scaled
here. Outputs: ``logits`` and ``probabilities`` (the calibrated softmax of the
logits, as every consumer of the model computes it), both ``FP32 [-1, 10]``.

Spec: https://github.com/kserve/open-inference-protocol (inference_rest.md);
binary tensors: Triton's protocol/extension_binary_data.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from ..inference import manifest as manifest_lib
from .errors import BadRequest

PROTOCOL_VERSION = "2"
OUTPUTS = ("logits", "probabilities")
INPUT_TYPES = {"FP32": np.float32, "UINT8": np.uint8}
MAX_HEADER_BYTES = 1 << 20  # the JSON part of a binary request; tensors follow it


@dataclass
class InferRequest:
    id: str | None
    images: np.ndarray  # the model's input batch, float32 [N, 1, H, W]
    outputs: list = field(default_factory=list)  # [(output name, as binary?)] in the order asked for


def server_metadata(version: str) -> dict:
    return {"name": "mnist-dist", "version": version, "extensions": ["binary_tensor_data", "model_repository"]}


def model_metadata(name: str, versions: list, contract: dict, platform: str) -> dict:
    """Name, loaded versions, platform and the tensors the model takes and gives, with -1 for the batch
    dimension."""
    shape = [-1 if isinstance(d, str) else d for d in contract["input"]["shape"]]
    classes = len(contract["classes"])
    return {"name": name, "versions": versions, "platform": platform,
            "inputs": [{"name": contract["input"]["name"], "datatype": "FP32", "shape": shape}],
            "outputs": [{"name": output, "datatype": "FP32", "shape": [-1, classes]} for output in OUTPUTS]}


def parse_infer(body: bytes, header_length: str | None, contract: dict, max_images: int) -> InferRequest:
    """The request's input batch and asked-for outputs; BadRequest for anything the spec or the model refuses."""
    header, binary = split_body(body, header_length)
    request = decode_json(header)
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequest(f"expected exactly one input, {contract['input']['name']!r}")
    images = read_tensor(inputs[0], binary, contract, max_images)
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("'id' must be a string")
    return InferRequest(request_id, images, requested_outputs(request))


def split_body(body: bytes, header_length: str | None) -> tuple:
    """(JSON header bytes, the binary tensor bytes that follow it)."""
    if header_length is None:
        return body, b""
    if not header_length.isdigit() or int(header_length) > len(body):
        raise BadRequest(f"Inference-Header-Content-Length {header_length!r} does not fit a "
                            f"{len(body)}-byte body")
    if int(header_length) > MAX_HEADER_BYTES:
        raise BadRequest(f"the JSON header is over {MAX_HEADER_BYTES:,} bytes: send tensors as binary data", 413)
    split = int(header_length)
    return body[:split], body[split:]


def decode_json(header: bytes) -> dict:
    try:
        request = orjson.loads(header)
    except orjson.JSONDecodeError:
        raise BadRequest("the request is not valid JSON") from None
    if not isinstance(request, dict):
        raise BadRequest("the request must be a JSON object")
    return request


def read_tensor(spec: dict, binary: bytes, contract: dict, max_images: int) -> np.ndarray:
    """The one input tensor, checked against the model's contract, as its float32 input batch."""
    name, expected = contract["input"]["name"], [1, *manifest_lib.image_size(contract)]
    if spec.get("name") != name:
        raise BadRequest(f"unknown input {spec.get('name')!r}; the model takes {name!r}")
    datatype, shape = spec.get("datatype"), spec.get("shape")
    if datatype not in INPUT_TYPES:
        raise BadRequest(f"datatype {datatype!r}; expected one of {', '.join(INPUT_TYPES)}")
    if not (isinstance(shape, list) and all(type(d) is int for d in shape) and len(shape) == 4
            and shape[1:] == expected and shape[0] >= 1):
        raise BadRequest(f"shape {shape!r}; expected [N, {', '.join(map(str, expected))}]")
    if shape[0] > max_images:
        raise BadRequest(f"{shape[0]} images; at most {max_images} per request", 413)
    dtype = np.dtype(INPUT_TYPES[datatype]).newbyteorder("<")
    count = math.prod(shape)
    parameters = spec.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequest("'parameters' must be an object")
    if "binary_data_size" in parameters:
        values = binary_values(parameters["binary_data_size"], binary, dtype, count)
    else:
        if binary:
            raise BadRequest("binary data follows the JSON, but the input does not declare binary_data_size")
        values = json_values(spec.get("data"), dtype, count)
    values = values.reshape(shape)
    if datatype == "UINT8":
        return manifest_lib.model_input(values, contract)
    if not np.isfinite(values).all():
        raise BadRequest("FP32 input values must be finite")
    return np.ascontiguousarray(values, dtype=np.float32)


def binary_values(size: Any, binary: bytes, dtype: np.dtype, count: int) -> np.ndarray:
    if type(size) is not int or size != len(binary):
        raise BadRequest(f"binary_data_size {size!r}, but {len(binary)} bytes follow the JSON")
    if size != count * dtype.itemsize:
        raise BadRequest(f"{size} bytes of binary data; the shape needs {count * dtype.itemsize}")
    return np.frombuffer(binary, dtype=dtype)


def json_values(data: Any, dtype: np.dtype, count: int) -> np.ndarray:
    """Flat or nested JSON numbers, as many as the shape says, each valid for the datatype."""
    if not isinstance(data, list):
        raise BadRequest("the input has neither 'data' nor binary_data_size")
    try:
        values = np.asarray(data, dtype=np.float64).reshape(-1)
    except (ValueError, TypeError):
        raise BadRequest("'data' must hold numbers only, flat or nested as the shape") from None
    if values.size != count:
        raise BadRequest(f"'data' holds {values.size} values; the shape needs {count}")
    if dtype.kind == "u" and not ((values >= 0) & (values <= 255) & (values == np.round(values))).all():
        raise BadRequest("UINT8 values must be whole numbers 0..255")
    return values.astype(dtype)


def requested_outputs(request: dict) -> list:
    """[(name, binary?)]: those asked for, else all; binary per output, else per request (binary_data_output)."""
    parameters = request.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequest("'parameters' must be an object")
    default_binary = parameters.get("binary_data_output", False) is True
    asked = request.get("outputs")
    if asked is None:
        return [(name, default_binary) for name in OUTPUTS]
    if not isinstance(asked, list) or not all(isinstance(o, dict) for o in asked):
        raise BadRequest("'outputs' must be a list of objects")
    chosen = []
    for output in asked:
        if output.get("name") not in OUTPUTS:
            raise BadRequest(f"unknown output {output.get('name')!r}; the model gives {', '.join(OUTPUTS)}")
        options = output.get("parameters") or {}
        if not isinstance(options, dict):
            raise BadRequest("an output's 'parameters' must be an object")
        chosen.append((output["name"], options.get("binary_data", default_binary) is True))
    return chosen


def encode_infer(model_name: str, model_version: str, request: InferRequest, logits: np.ndarray,
                 probabilities: np.ndarray) -> tuple:
    """(body bytes, JSON header length or None): JSON alone, or JSON followed by the binary outputs."""
    tensors = {"logits": logits, "probabilities": probabilities}
    described, blobs = [], []
    for name, binary in request.outputs:
        values = np.ascontiguousarray(tensors[name], dtype="<f4")
        entry: dict = {"name": name, "datatype": "FP32", "shape": list(values.shape)}
        if binary:
            blobs.append(values.tobytes())
            entry["parameters"] = {"binary_data_size": len(blobs[-1])}
        else:
            entry["data"] = values.reshape(-1).tolist()
        described.append(entry)
    answer: dict = {"model_name": model_name, "model_version": model_version, "outputs": described}
    if request.id is not None:
        answer["id"] = request.id
    header = orjson.dumps(answer)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)
