"""The minimal QLoRA trainer: ``train(TrainConfig(...))``, or ``qlora-train`` on the command line.

>>> from qlora_kernels.train import TrainConfig, train
>>> result = train(TrainConfig(max_steps=50))          # the built-in default job
>>> result.adapter_dir                                  # peft-format adapter
"""

from .config import PRESETS, TrainConfig
from .data import DataError
from .loop import TrainingError, TrainResult, train
from .model import ModelError

__all__ = ["DataError", "ModelError", "PRESETS", "TrainConfig", "TrainResult", "TrainingError", "train"]
