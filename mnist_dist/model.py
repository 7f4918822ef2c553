"""The tutorial's handwritten-digit CNN, kept layer for layer.

This file imports only torch so that export and inference can rebuild the
model from a checkpoint's ``model_config`` without any training code.
Module names (conv1, conv2, conv3, out) match the tutorial, so its
state_dicts load here unchanged.
"""
import torch
from torch import nn

ARCH = "mnist-cnn-v1"
IMAGE_SIZE = 28
NUM_PARAMETERS = 121_514


class CNN(nn.Module):
    """conv(1->16,k5,p2)+ReLU+pool; conv(16->32)+ReLU, conv(32->32)+ReLU, pool;
    conv(32->64)+ReLU; flatten; Linear(64*7*7 -> 10)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, 16, kernel_size=5, stride=1, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2),
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(16, 32, 5, 1, 2),
            nn.ReLU(),
            nn.Conv2d(32, 32, 5, 1, 2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.conv3 = nn.Sequential(
            nn.Conv2d(32, 64, 5, 1, 2),
            nn.ReLU(),
        )
        self.out = nn.Linear(64 * 7 * 7, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.conv2(x)
        x = self.conv3(x)
        # flatten(1) rather than view(): it also accepts channels_last tensors.
        return self.out(x.flatten(1))

    @property
    def config(self) -> dict:
        """Everything needed to rebuild this model; stored in every checkpoint."""
        return {"arch": ARCH, "in_channels": self.in_channels, "num_classes": self.num_classes}


def build_model(config: dict) -> CNN:
    """Rebuild the CNN from a checkpoint's ``model_config``."""
    if config.get("arch") != ARCH:
        raise ValueError(f"unknown architecture {config.get('arch')!r} (expected {ARCH!r})")
    return CNN(in_channels=config["in_channels"], num_classes=config["num_classes"])


def from_state(state: dict) -> CNN:
    """The CNN of a checkpoint or an export's reference: its ``model_config`` and ``model`` weights."""
    model = build_model(state["model_config"])
    model.load_state_dict(state["model"])
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
