"""Inference: runtimes for exported models, image preparation, predict and the inference benchmark."""
