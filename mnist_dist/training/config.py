"""Training settings: presets, one dataclass, checked before anything is written."""
from dataclasses import asdict, dataclass
from typing import Optional

from ..errors import UserError

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
SCHEDULES = ("constant", "onecycle")

# The recipe knobs each preset sets; command-line options override them one by one.
PRESETS = {
    # The tutorial, exactly: Adam 1e-3, batch 64, 8 epochs, fp32, constant rate.
    "tutorial": dict(epochs=8, batch_size=64, lr=1e-3, schedule="constant", warmup=0.3, mixed_precision="no",
                     channels_last=False, label_smoothing=0.0, augment=False, ema=0.0),
    # One epoch: a one-cycle schedule to a high peak rate with strong label smoothing (searched over batch size,
    # peak rate, warm-up, smoothing and a weight average; 99.34-99.41% over 5 seeds on a 2-core CPU in bf16,
    # 99.28-99.35% in fp32). bf16 only on CPUs that run it natively.
    "fast": dict(epochs=1, batch_size=128, lr=1.2e-2, schedule="onecycle", warmup=0.3, mixed_precision="auto",
                 channels_last=True, label_smoothing=0.2, augment=False, ema=0.0),
    # Toward 99.7%: small random affine augmentation, label smoothing, a longer one-cycle (99.63-99.70% over 3
    # seeds in 12 epochs on a 2-core CPU in bf16; 15 epochs at a peak of 3e-3 gave 99.60-99.65%).
    "best": dict(epochs=12, batch_size=128, lr=5e-3, schedule="onecycle", warmup=0.3, mixed_precision="auto",
                 channels_last=True, label_smoothing=0.1, augment=True, ema=0.0),
}
DEFAULT_PRESET = "fast"


@dataclass
class TrainConfig:
    data_dir: Optional[str] = None
    output_dir: str = "runs/mnist"
    preset: Optional[str] = None  # None: the resumed run's preset, else DEFAULT_PRESET
    epochs: Optional[int] = None
    batch_size: Optional[int] = None  # per process; the global batch is batch_size * processes
    lr: Optional[float] = None
    schedule: Optional[str] = None
    warmup: Optional[float] = None  # onecycle: share of the steps spent rising to the peak rate
    mixed_precision: Optional[str] = None
    channels_last: Optional[bool] = None
    label_smoothing: Optional[float] = None
    augment: Optional[bool] = None
    ema: Optional[float] = None  # decay of an exponential moving average of the weights; 0 = none
    seed: Optional[int] = None  # None: the resumed run's seed, else 0
    eval_batch_size: int = 1000
    resume: Optional[str] = None
    limit_batches: Optional[int] = None  # None: the resumed run's limit, else none
    log_every: int = 200
    metrics_every: int = 20
    threads: Optional[int] = None
    report_to: str = "none"
    overwrite: bool = False
    download: bool = True
    cpu: bool = False

    def fill_recipe(self, recorded: Optional[dict] = None) -> "TrainConfig":
        """Fill each knob left unset: from the run being resumed if any, else from the preset (or the default).

        The seed and --limit-batches decide which images each step sees, so a resumed run keeps them too.
        """
        recorded = recorded or {}
        if self.preset is None:
            self.preset = recorded.get("preset", DEFAULT_PRESET)
        if self.preset not in PRESETS:
            raise UserError(f"--preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        for name, value in {**PRESETS[self.preset], "seed": 0, "limit_batches": None}.items():
            if getattr(self, name) is None:
                setattr(self, name, recorded.get(name, value))
        return self

    def validate(self) -> "TrainConfig":
        for name in ("epochs", "batch_size", "eval_batch_size", "log_every", "metrics_every"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        for name in ("limit_batches", "threads"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        lr, smoothing, warmup, ema = self.lr, self.label_smoothing, self.warmup, self.ema
        # fill_recipe() sets every knob before validate()
        assert lr is not None and smoothing is not None and warmup is not None and ema is not None
        if not lr > 0:
            raise UserError(f"--lr must be positive, got {lr}")
        if not 0 <= smoothing < 1:
            raise UserError(f"--label-smoothing must be in [0, 1), got {smoothing}")
        if not 0 < warmup < 1:
            raise UserError(f"--warmup must be in (0, 1), got {warmup}")
        if not 0 <= ema < 1:
            raise UserError(f"--ema must be in [0, 1) (0 turns it off), got {ema}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise UserError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"--schedule must be one of {', '.join(SCHEDULES)}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def cell(knob: str, recipe: dict) -> str:
    value = recipe[knob]
    if knob == "warmup" and recipe["schedule"] != "onecycle":
        return "-"
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def readme_table(reports: list) -> str:
    """The README's table of presets, drawn from PRESETS so that the two cannot disagree."""
    knobs = ("epochs", "batch_size", "lr", "schedule", "warmup", "label_smoothing", "augment", "ema",
             "mixed_precision", "channels_last")
    lines = ["| preset | " + " | ".join(k.replace("_", " ") for k in knobs) + " |",
             "|---|" + "---|" * len(knobs)]
    for name, recipe in PRESETS.items():
        shown = f"`{name}`" + (" (default)" if name == DEFAULT_PRESET else "")
        cells = [cell(k, recipe) for k in knobs]
        lines.append(f"| {shown} | " + " | ".join(cells) + " |")
    lines += ["", "Generated by `jobs/perf_table.py` from `mnist_dist/training/config.py`. The learning rate is "
              "Adam's (the peak of a one-cycle schedule); the batch is per process; `auto` precision is bf16 on "
              "CPUs with native bf16 and fp32 elsewhere; `ema` 0 means no weight average."]
    return "\n".join(lines)
