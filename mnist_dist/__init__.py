"""mnist-dist: the tutorial MNIST CNN, trained with Accelerate, exported, and served."""

__version__ = "0.1.0"
