"""What the OpenAPI schema (/openapi.json, the /docs page) says of the routes that read their requests themselves.

The two routes that carry images are plain Starlette routes (FastAPI's
parameter machinery cost more than the rest of a request), so their
parameters and bodies are described here; clients, the docs page and the API
fuzz test read them.
"""


def model_name(names: list) -> dict:
    return {"name": "name", "in": "path", "required": True, "schema": {"type": "string", "enum": names},
            "description": "A model's name: its folder in the model repository (serve --model-name for one export "
                           "folder; mnist by default)"}


def model_path(names: list) -> dict:
    return {"parameters": [model_name(names)]}


VERSION = {"name": "version", "in": "path", "required": True, "schema": {"type": "string", "pattern": "^[1-9][0-9]*$"},
           "description": "One of the model's loaded versions (its folder's number)"}


def version_path(names: list) -> dict:
    return {"parameters": [model_name(names), VERSION]}

TENSOR = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string", "enum": ["images"]},
        "datatype": {"type": "string", "enum": ["FP32", "UINT8"],
                     "description": "FP32 (pixels / 255) or UINT8 (pixels 0..255)"},
        "shape": {"type": "array", "items": {"type": "integer"}, "minItems": 4, "maxItems": 4,
                  "description": "[N, 1, 28, 28]"},
        "data": {"type": "array", "items": {"type": "number"}, "description": "the values, flat (or nested)"},
        "parameters": {"type": "object", "description": "binary_data_size: bytes of this tensor after the JSON"},
    },
}

def busy_paths(names: list) -> dict:
    """The path items of POST /v2/models/{name}[/versions/{version}]/infer and POST /v1/predict."""
    infer = {"summary": "Inference (the newest version): FP32 or UINT8 [N,1,28,28] in; logits, probabilities out",
             "parameters": [model_name(names), INFER_HEADER], "requestBody": INFER_BODY, "responses": RESPONSES}
    versioned = {**infer, "summary": "Inference (one version)",
                 "parameters": [model_name(names), VERSION, INFER_HEADER]}
    predict = {"summary": "Label images: multipart fields named 'file', or JSON {\"images\": [...]}",
               **V1_PREDICT, "responses": RESPONSES}
    return {"/v2/models/{name}/infer": {"post": infer}, "/v2/models/{name}/versions/{version}/infer":
            {"post": versioned}, "/v1/predict": {"post": predict}}


RESPONSES = {
    "200": {"description": "The answer (JSON; for binary outputs, JSON then the tensors' bytes)"},
    "4XX": {"description": "The request cannot be taken: {\"error\": \"one line\"}"},
    "503": {"description": "Too busy (Retry-After) or not running"},
    "504": {"description": "No answer from the model within --timeout-s"},
}


INFER_HEADER = {
        "name": "Inference-Header-Content-Length", "in": "header", "required": False, "schema": {"type": "string"},
        "description": "Bytes of JSON at the start of the body; binary tensors follow it"}

INFER_BODY = {"required": True, "content": {
        "application/json": {"schema": {
            "type": "object",
            "required": ["inputs"],
            "properties": {
                "id": {"type": "string"},
                "parameters": {"type": "object", "description": "binary_data_output: answer in binary"},
                "inputs": {"type": "array", "items": TENSOR},
                "outputs": {"type": "array", "items": {
                    "type": "object", "required": ["name"],
                    "properties": {"name": {"type": "string", "enum": ["logits", "probabilities"]},
                                   "parameters": {"type": "object", "description": "binary_data: true or false"}}}},
            },
        }},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    }}

V1_PREDICT = {
    "parameters": [
        {"name": "invert", "in": "query", "required": False,
         "schema": {"type": "string", "enum": ["auto", "yes", "no"], "default": "auto"},
         "description": "Polarity: auto (by the border), yes (dark digit on light), no"},
        {"name": "return_image", "in": "query", "required": False, "schema": {"type": "string"},
         "description": "1: add the 28x28 image the model saw to each result"},
    ],
    "requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {
            "type": "object",
            "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}},
        }},
        "application/json": {"schema": {
            "type": "object", "required": ["images"],
            "properties": {"images": {"type": "array", "items": {"type": "array"},
                                      "description": "28x28 arrays: integers 0..255, or floats 0..1"}},
        }},
    }},
}
