"""Test-set evaluation that counts every image exactly once."""
import torch
import torch.nn.functional as F

from ..data import batches, mnist
from ..errors import UserError
from ..launch import apply_threads, make_accelerator
from . import checkpoint


@torch.no_grad()
def evaluate(model, loader, gather=None) -> dict:
    """Accuracy and mean cross-entropy over every sample the loader yields.

    ``gather`` merges per-sample values across processes; with Accelerate pass
    ``accelerator.gather_for_metrics``, which also drops the duplicates that
    pad the last batch, so the count is exactly the dataset size.
    """
    model.eval()
    losses, hits = [], []
    for images, labels in loader:
        logits = model(images).float()
        loss = F.cross_entropy(logits, labels, reduction="none")
        hit = (logits.argmax(1) == labels).float()  # float: gloo cannot all-gather bools
        if gather is not None:
            loss, hit = gather((loss, hit))
        losses.append(loss)
        hits.append(hit)
    every_loss, every_hit = torch.cat(losses), torch.cat(hits)
    correct, samples = int(every_hit.sum().item()), every_hit.numel()
    return {
        "test_accuracy": correct / samples,
        "test_loss": every_loss.double().mean().item(),
        "test_samples": samples,
        "test_correct": correct,
    }


def evaluate_checkpoint(path, data_dir=None, batch_size: int = 1000, download: bool = True, cpu: bool = False,
                        threads=None) -> dict:
    """Test metrics of a checkpoint (or a run dir's latest), across however many processes were launched."""
    if batch_size <= 0:
        raise UserError(f"--batch-size must be a positive integer, got {batch_size}")
    apply_threads(threads)
    accelerator = make_accelerator(cpu=cpu)
    try:
        model, _ = checkpoint.load_model(checkpoint.resolve_checkpoint(path))
        with accelerator.local_main_process_first():
            test_set = batches.TensorBatches(*mnist.load_split("test", data_dir, download))
        if accelerator.device.type != "cpu":
            test_set = test_set.to(accelerator.device)
        model, loader = accelerator.prepare(model, batches.make_loader(test_set, batch_size, shuffle=False))
        metrics = evaluate(model, loader, accelerator.gather_for_metrics)
        metrics["processes"] = accelerator.num_processes
        accelerator.print(
            f"Test result: Accuracy: {100 * metrics['test_accuracy']:.2f}% "
            f"({metrics['test_correct']}/{metrics['test_samples']}), Avg loss: {metrics['test_loss']:.6f}"
        )
        return metrics
    finally:
        accelerator.end_training()
