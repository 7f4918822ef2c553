"""Evaluate a checkpoint on the full test set.

    accelerate launch jobs/evaluate.py CHECKPOINT [OPTIONS]
    python jobs/evaluate.py CHECKPOINT [OPTIONS]

Same options as `mnist-dist evaluate`; see --help.
"""
from mnist_dist.cli import evaluate

if __name__ == "__main__":
    evaluate(prog_name="jobs/evaluate.py")
