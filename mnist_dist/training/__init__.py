"""Training: the recipe, the Accelerate-driven loop, checkpoints, evaluation and the training benchmark."""
