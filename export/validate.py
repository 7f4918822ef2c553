"""Validate an export folder against PyTorch on the whole MNIST test set.

    python export/validate.py artifacts/mnist

Same options as `mnist-dist validate`; see --help.
"""
from mnist_dist.cli import validate

if __name__ == "__main__":
    validate(prog_name="export/validate.py")
