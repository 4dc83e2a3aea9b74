"""The training engine of the training image: SFT (full, LoRA), OSFT; packing; DDP/FSDP2; checkpoints.

It never imports KFP. Entry point: ``torchrun ... -m kfp_components.trainer --config run.yaml``.
"""

from kfp_components.trainer.config import TrainingConfig

__all__ = ["TrainingConfig"]
