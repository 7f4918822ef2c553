"""The exported model deploys without the training stack: a lean install, no torch on the inference path, one
line for a missing extra, and a house whose layers only import downwards."""
import ast
import json
import re
import shlex
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import httpx
import pytest
from packaging.utils import canonicalize_name

from conftest import ROOT, cpu_env, locked_versions, run, write_test_pngs

TRAINING_STACK = ("torch", "accelerate", "onnx", "torchvision", "matplotlib")

# A meta-path finder that makes the named packages unimportable, as in an install without their extra.
BLOCK_IMPORTS = """
import sys
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Blocked())
"""
# Runs the CLI, then reports which parts of the training stack the process imported: at exit, or when a line
# arrives on stdin (a server is stopped by a signal, which skips exit handlers).
REPORT_MODULES = """
import atexit, json, sys, threading
def report():
    print("MODULES " + json.dumps(sorted(m for m in {stack!r} if m in sys.modules)), file=sys.stderr, flush=True)
atexit.register(report)
threading.Thread(target=lambda: (sys.stdin.readline(), report()), daemon=True).start()
from mnist_dist.cli import main
sys.argv[0] = "mnist-dist"
main()
"""


def cli_with(*args, blocked=(), python=sys.executable) -> list:
    """A command line running mnist-dist with ``blocked`` packages unimportable and the module report."""
    code = (BLOCK_IMPORTS.format(blocked=set(blocked)) if blocked else "") + REPORT_MODULES.format(stack=TRAINING_STACK)
    return [python, "-c", code, *map(str, args)]


def imported_stack(stderr: str) -> list:
    (line,) = [line for line in stderr.splitlines() if line.startswith("MODULES ")][-1:]
    return json.loads(line.split(" ", 1)[1])


@pytest.fixture(scope="module")
def pngs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("deploy-pngs")
    write_test_pngs(folder, 200)
    return folder


def start_server(cmd: list, env=None, cwd=ROOT) -> tuple:
    """(process, base URL) of ``mnist-dist serve ... --port 0``, once it answers."""
    proc = subprocess.Popen([*map(str, cmd), "--port", "0"], cwd=cwd, env=env or cpu_env(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:\d+/", line)
    if match is None:
        proc.kill()
        raise AssertionError(f"the server did not start: {line}{proc.stderr.read()}")
    return proc, match.group(0)


def served_answers(url: str, folder: Path) -> list:
    files = sorted(folder.iterdir())
    answers = []
    for start in range(0, len(files), 50):
        fields = [("file", (f.name, f.read_bytes(), "image/png")) for f in files[start : start + 50]]
        response = httpx.post(url + "v1/predict", files=fields, timeout=60)
        assert response.status_code == 200, response.text
        answers += [(r["input"], r["prediction"], round(r["confidence"], 6)) for r in response.json()["results"]]
    return answers


def test_predict_on_onnx_imports_no_training_stack(exported_model, pngs, tmp_path):
    out = tmp_path / "preds.csv"
    proc = run(cli_with("predict", pngs, "--model", exported_model / "model.onnx", "--out", out))
    assert imported_stack(proc.stderr) == []
    assert "200 inputs, 0 failed" in proc.stderr
    # TorchScript needs torch, and loads it: the report does see an import when there is one.
    proc = run(cli_with("predict", pngs, "--model", exported_model / "model.ts", "--out", tmp_path / "ts.csv"))
    assert "torch" in imported_stack(proc.stderr)


def test_serve_imports_no_training_stack(exported_model, pngs):
    proc, url = start_server(cli_with("serve", "--model-dir", exported_model))
    try:
        assert len(served_answers(url, pngs)) == 200
        proc.stdin.write("report\n")
        proc.stdin.flush()
        line = ""
        while not line.startswith("MODULES "):
            line = proc.stderr.readline()
        assert imported_stack(line) == []
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("args, blocked, extra", [
    (["train", "--epochs", "1"], ["torch"], "train"),
    (["export", "--checkpoint", "run", "--out-dir", "model"], ["onnxscript"], "train"),
    (["bench", "--model-dir", "MODEL"], ["torch"], "train"),
    (["serve", "--model-dir", "MODEL"], ["fastapi"], "serve"),
    (["predict", "PNGS", "--model", "MODEL/model.ts"], ["torch"], "train"),
    (["predict", "PNGS", "--model", "MODEL/model.onnx", "--runtime", "openvino"], ["openvino"], "openvino"),
    (["predict", "s3://bucket/scans/", "--model", "MODEL/model.onnx"], ["s3fs"], "s3"),
    (["predict", "PNGS", "--model", "MODEL/model.onnx", "--out", "preds.parquet"], ["pyarrow"], "parquet"),
])
def test_a_missing_extra_is_one_line_naming_it(exported_model, pngs, tmp_path, args, blocked, extra):
    args = [str(a).replace("MODEL", str(exported_model)).replace("PNGS", str(pngs)) for a in args]
    proc = run(cli_with(*args, blocked=blocked), check=False, cwd=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f'pip install "mnist-dist[{extra}]"' in errors[0] and blocked[0] in errors[0]
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_predict_on_onnx_needs_no_training_stack(exported_model, pngs, tmp_path):
    """With torch, accelerate and onnx unimportable, predict gives the very bytes of the full install."""
    outs = {}
    for name, blocked in (("lean", TRAINING_STACK), ("full", ())):
        outs[name] = tmp_path / f"{name}.csv"
        run(cli_with("predict", pngs, "--model", exported_model / "model.onnx", "--out", outs[name], blocked=blocked))
    assert outs["lean"].read_bytes() == outs["full"].read_bytes()


def dockerfile() -> tuple:
    """What the Dockerfile does that matters outside a container: (its pip install, its environment, its
    entrypoint and command)."""
    text = (ROOT / "Dockerfile").read_text()
    (install,) = re.findall(r"^RUN (pip install .*)$", text, re.M)
    env: dict = {}
    for line in re.findall(r"^ENV (.*)$", text, re.M):
        env.update(pair.split("=", 1) for pair in shlex.split(line))
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (.*)$", text, re.M).group(1))
    command = json.loads(re.search(r"^CMD (.*)$", text, re.M).group(1))
    return shlex.split(install), env, entrypoint + command


def lean_venv(tmp_path: Path) -> Path:
    """A new virtual environment holding the Dockerfile's locked server install (`pip install -c
    constraints/serve.txt ".[serve,s3]"`, as the README's), of a clean copy of this checkout, and nothing else: no
    torch, no accelerate, no onnx."""
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "*.egg-info", "build", "dist", "__pycache__",
                                                                  ".pytest_cache", "runs", "artifacts"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install, env, _ = dockerfile()
    assert install[:2] == ["pip", "install"]
    subprocess.run([python, "-m", *install, "-q"], check=True, capture_output=True, timeout=600, cwd=source,
                   env=dict(cpu_env(), **env))
    return python


@pytest.mark.skipif(sys.platform == "win32", reason="the venv layout differs")
def test_the_lean_install_predicts_and_serves_as_the_full_one(exported_model, pngs, tmp_path):
    python = lean_venv(tmp_path)
    installed = subprocess.run([python, "-m", "pip", "list", "--format", "json"], check=True, capture_output=True,
                               text=True).stdout
    versions = {canonicalize_name(p["name"]): p["version"] for p in json.loads(installed)}
    names = set(versions)
    assert "onnxruntime" in names and "fastapi" in names
    # The lock still resolves, and holds the whole install: every package at its locked version.
    pins = locked_versions(ROOT / "constraints" / "serve.txt")
    venv_own = ("pip", "setuptools", "mnist-dist")
    installed_deps = {name: version for name, version in versions.items() if name not in venv_own}
    assert {name: pins.get(name) for name in installed_deps} == installed_deps
    assert not names & {"torch", "torchvision", "accelerate", "onnx", "onnxscript", "matplotlib"}
    lean_env = cpu_env(PYTHONPATH="")  # the venv's own site-packages only
    outs = {}
    for name, py in (("lean", python), ("full", sys.executable)):
        outs[name] = tmp_path / f"{name}.csv"
        run([py, "-m", "mnist_dist.cli", "predict", pngs, "--model", exported_model / "model.onnx",
             "--runtime", "onnxruntime", "--out", outs[name]], env=lean_env, cwd=tmp_path)
    assert outs["lean"].read_bytes() == outs["full"].read_bytes()
    # The container's command and environment, the repository "mounted" where STORAGE_URI says.
    _, container_env, command = dockerfile()
    shutil.copytree(exported_model, tmp_path / "mnt" / "models" / "mnist" / "1")
    container_env = {**lean_env, **container_env, "STORAGE_URI": str(tmp_path / "mnt" / "models"),
                     "XDG_CACHE_HOME": str(tmp_path / "cache")}
    assert command[:2] == ["mnist-dist", "serve"]
    servers = {"lean": ([python.parent / command[0], *command[1:], "--host", "127.0.0.1"], container_env),
               "full": ([sys.executable, "-m", "mnist_dist.cli", "serve", "--model-dir", exported_model], lean_env)}
    answers = {}
    for name, (cmd, env) in servers.items():
        proc, url = start_server([*cmd, "--runtime", "onnxruntime"], env=env, cwd=tmp_path)
        try:
            answers[name] = served_answers(url, pngs)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    assert answers["lean"] == answers["full"] and len(answers["lean"]) == 200
    proc = run([python, "-m", "mnist_dist.cli", "train"], env=lean_env, check=False, cwd=tmp_path)
    assert proc.returncode == 1 and 'pip install "mnist-dist[train]"' in proc.stderr


# The house, bottom to top: a module may import from its own layer or a lower one, never a higher one.
LAYERS = [
    {"errors", "extras", "atomic", "locks", "scores", "sysinfo", "launch", "interrupt", "collective", "model", "data"},
    {"inference"},
    {"reports", "serving"},
    {"training"},
    {"exporting"},
    {"bench", "cli"},
]
# The torch-free bottom: importing these loads no part of the training stack.
TORCH_FREE = [
    "errors", "extras", "atomic", "locks", "scores", "sysinfo", "launch", "interrupt", "collective", "data.idx",
    "inference.manifest", "inference.runtimes", "inference.models", "inference.images", "inference.inputs",
    "inference.outputs", "inference.chunks", "inference.storage", "inference.lease", "inference.predict",
    "inference.repository", "serving.app", "serving.batching", "serving.model", "serving.repository",
    "serving.sources", "serving.server", "cli"
]


def mnist_dist_imports(path: Path) -> set:
    """The mnist_dist parts a module imports (top-level names after ``mnist_dist.``), wherever in the file."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                target = [*base, *(node.module.split(".") if node.module else [])]
                names = [[*target, alias.name] for alias in node.names] if not node.module else [target]
            else:
                names = [node.module.split(".")] if node.module else []
            found |= {part_of(n[1]) for n in names if len(n) > 1 and n[0] == "mnist_dist"}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("mnist_dist.")}
    return found


def part_of(name: str) -> str:
    """A module or package of mnist_dist, or, for a name defined in the package itself (__version__), __init__."""
    package = ROOT / "mnist_dist"
    return name if (package / f"{name}.py").is_file() or (package / name).is_dir() else "__init__"


def layer_of(part: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if part in layer)


def test_layers_only_import_downwards():
    upward = []
    for path in sorted((ROOT / "mnist_dist").rglob("*.py")):
        own = path.relative_to(ROOT / "mnist_dist").parts[0].removesuffix(".py")
        if own == "__init__":
            continue
        for part in mnist_dist_imports(path):
            if part != "__init__" and layer_of(part) > layer_of(own):
                upward.append(f"{path.relative_to(ROOT)} imports {part}")
    assert upward == []


def test_the_torch_free_bottom_loads_no_training_stack():
    code = ("import importlib, json, sys\n"
            f"for name in {TORCH_FREE!r}: importlib.import_module('mnist_dist.' + name)\n"
            f"print(json.dumps(sorted(m for m in {TRAINING_STACK!r} if m in sys.modules)))")
    assert json.loads(run([sys.executable, "-c", code]).stdout) == []
