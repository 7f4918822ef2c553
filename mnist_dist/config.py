"""Training settings: one dataclass, checked before anything is written."""
from dataclasses import asdict, dataclass, fields
from typing import Optional

from .errors import UserError

MIXED_PRECISION = ("no", "bf16", "fp16")
SCHEDULES = ("constant", "onecycle")


@dataclass
class TrainConfig:
    data_dir: Optional[str] = None
    output_dir: str = "runs/mnist"
    epochs: int = 8
    batch_size: int = 64  # per process; the global batch is batch_size * processes
    lr: float = 1e-3
    seed: int = 0
    mixed_precision: str = "no"
    schedule: str = "constant"
    channels_last: bool = False
    eval_batch_size: int = 1000
    resume: Optional[str] = None
    limit_batches: Optional[int] = None
    log_every: int = 200
    overwrite: bool = False
    download: bool = True
    cpu: bool = False

    def validate(self) -> "TrainConfig":
        positive = ("epochs", "batch_size", "eval_batch_size", "log_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        if self.limit_batches is not None and self.limit_batches <= 0:
            raise UserError(f"--limit-batches must be a positive integer, got {self.limit_batches}")
        if not self.lr > 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise UserError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"--schedule must be one of {', '.join(SCHEDULES)}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> set:
        return {f.name for f in fields(cls)}
