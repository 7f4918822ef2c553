"""Scores from logits, computed one way everywhere: probabilities and accuracy."""
import numpy as np


def softmax(logits) -> np.ndarray:
    """Rows of logits -> rows of probabilities (float64, each row summing to 1), stable for large logits."""
    logits = np.asarray(logits, np.float64)
    z = np.exp(logits - logits.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def accuracy(logits, labels) -> float:
    """Share of rows whose highest logit is the label."""
    return float((np.asarray(logits).argmax(1) == np.asarray(labels)).mean())
