"""Scores from logits, computed one way everywhere: probabilities, accuracy and how well calibrated they are.

Every consumer of an exported model (predict, serve, bench, report) turns logits into probabilities with
``softmax(logits, temperature)``, the temperature being the one fitted at export and kept in the manifest:
dividing the logits by it changes no argmax, only how sure the answers say they are.
"""
import numpy as np

CALIBRATION_BINS = 15  # equal-width confidence bins of the expected calibration error, as in Guo et al. (2017)
CONFIDENT = 0.9  # the threshold of selective accuracy: answers at least this sure


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    """Rows of logits -> rows of probabilities (float64, each row summing to 1), stable for large logits.

    ``temperature`` divides the logits first: above 1 softens the answers, below 1 sharpens them.
    """
    logits = np.asarray(logits, np.float64) / temperature
    z = np.exp(logits - logits.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def accuracy(logits, labels) -> float:
    """Share of rows whose highest logit is the label."""
    return float((np.asarray(logits).argmax(1) == np.asarray(labels)).mean())


def negative_log_likelihood(probabilities, labels) -> float:
    """Mean -log p(label): what temperature scaling minimises, and a proper score of the probabilities."""
    picked = np.asarray(probabilities)[np.arange(len(labels)), np.asarray(labels)]
    return float(-np.log(np.maximum(picked, np.finfo(np.float64).tiny)).mean())


def expected_calibration_error(probabilities, labels, bins: int = CALIBRATION_BINS) -> float:
    """Mean gap between confidence and accuracy over equal-width confidence bins, weighted by their sizes."""
    return float(sum(abs(row["accuracy"] - row["confidence"]) * row["count"]
                     for row in reliability(probabilities, labels, bins)) / len(labels))


def reliability(probabilities, labels, bins: int = CALIBRATION_BINS) -> list:
    """Per non-empty confidence bin (lo, hi]: how many answers, their mean confidence and their accuracy."""
    probabilities, labels = np.asarray(probabilities), np.asarray(labels)
    confidence, right = probabilities.max(1), probabilities.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        members = which == b
        if members.any():
            rows.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": int(members.sum()),
                         "confidence": float(confidence[members].mean()), "accuracy": float(right[members].mean())})
    return rows


def calibration(logits, labels, temperature: float = 1.0) -> dict:
    """How far the probabilities can be trusted: ECE, NLL, and the share and accuracy of the confident answers."""
    probabilities, labels = softmax(logits, temperature), np.asarray(labels)
    confident = probabilities.max(1) >= CONFIDENT
    right = probabilities.argmax(1) == labels
    return {"temperature": float(temperature), "ece": expected_calibration_error(probabilities, labels),
            "nll": negative_log_likelihood(probabilities, labels),
            "mean_confidence": float(probabilities.max(1).mean()), "accuracy": float(right.mean()),
            "confident_share": float(confident.mean()),
            "confident_accuracy": float(right[confident].mean()) if confident.any() else None}


def before_and_after(logits, labels, temperature: float) -> dict:
    """calibration() without the temperature and with it, for the same logits."""
    return {"before": calibration(logits, labels), "after": calibration(logits, labels, temperature)}


def fit_temperature(logits, labels, iterations: int = 100) -> float:
    """The temperature that minimises the negative log-likelihood of ``labels`` (Guo et al. 2017).

    The NLL is convex in beta = 1/temperature (a log-sum-exp of lines in beta, minus a line), with gradient
    E_p[z] - z_label and curvature Var_p[z] >= 0, so Newton's method from beta = 1 finds the minimum; a step
    that would leave beta > 0 is halved instead.
    """
    z, labels = np.asarray(logits, np.float64), np.asarray(labels)
    z_label = z[np.arange(len(labels)), labels]
    beta = 1.0
    for _ in range(iterations):
        p = softmax(z * beta)
        mean_z = (p * z).sum(1)
        gradient = float((mean_z - z_label).mean())
        curvature = float(((p * z * z).sum(1) - mean_z ** 2).mean())
        if curvature <= 0:  # every answer one-hot already: no temperature changes anything
            break
        step = gradient / curvature
        while beta - step <= 0:
            step /= 2
        beta -= step
        if abs(step) < 1e-12 * beta:
            break
    return 1 / beta


def confident_answers(c: dict) -> str:
    """'98.3% (right 99.77%)': the share of answers at least CONFIDENT sure, and how often those are right."""
    right = "-" if c["confident_accuracy"] is None else f"{100 * c['confident_accuracy']:.2f}%"
    return f"{100 * c['confident_share']:.1f}% (right {right})"


def calibration_line(before: dict, after: dict) -> str:
    """Before and after temperature scaling, in one line: what a user thresholding on confidence needs."""
    return (f"temperature {after['temperature']:.3f}: ECE {100 * before['ece']:.2f}% -> {100 * after['ece']:.2f}%, "
            f"NLL {before['nll']:.4f} -> {after['nll']:.4f}, answers >= {CONFIDENT:g} sure "
            f"{confident_answers(before)} -> {confident_answers(after)}")
