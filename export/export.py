"""Export a trained checkpoint to TorchScript, ONNX and torch.export, then validate them.

    python export/export.py --checkpoint runs/mnist --out-dir artifacts/mnist

Same options as `mnist-dist export`; see --help.
"""
from mnist_dist.cli import export_command

if __name__ == "__main__":
    export_command(prog_name="export/export.py")
