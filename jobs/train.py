"""Train the MNIST CNN.

    accelerate launch jobs/train.py [OPTIONS]     # any number of processes / machines
    python jobs/train.py [OPTIONS]                # one process

Same options as `mnist-dist train`; see --help.
"""
from mnist_dist.cli import train

if __name__ == "__main__":
    train(prog_name="jobs/train.py")
