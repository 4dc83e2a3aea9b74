"""Compute precision in one place: the autocast context, loss scaling, backward and the optimizer step.

Weights, gradients and optimizer state stay in float32 (master weights); ``torch_dtype`` chooses what the
forward and backward compute in:

* ``bfloat16``: autocast to bf16. bf16 has float32's exponent range, so no loss scaling.
* ``float16``: autocast to fp16 with dynamic loss scaling (``torch.amp.GradScaler``), for GPUs without bf16
  (V100, T4). The loss is multiplied by the scale before backward, so small gradients do not underflow in
  fp16; :meth:`Precision.unscale` divides the gradients back before anything reads them (clipping, OSFT's
  gradient projection, the logged gradient norm). When the scaled gradients overflowed (inf or NaN),
  :meth:`Precision.step` skips the optimizer step and halves the scale; after 2000 steps without overflow
  the scale doubles. A skipped step does not advance the LR schedule (as in Hugging Face's Trainer).
* ``float32``: no autocast.

On a device type not in :data:`AUTOCAST_DEVICE_TYPES` (a CPU) every setting computes in float32:
:attr:`Precision.note` says so, and the engine logs it once.

Distributed training: under DDP the gradients are all-reduced before :meth:`Precision.unscale`, so every rank
finds the same overflow. Under FSDP2 every rank holds only its shard of each gradient (a DTensor). In torch
2.13 the plain ``torch.amp.GradScaler`` handles that: DTensor's handler of
``_amp_foreach_non_finite_check_and_unscale_`` (what ``unscale_`` calls) unscales the local shards and
all-reduces the overflow flag with a max over the device mesh, so all ranks skip the same steps and keep the
same scale. ``ShardedGradScaler`` is FSDP1's (flat parameters) and is not needed.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from kfp_components.typed_config import ConfigError

#: Device types on which a reduced torch_dtype autocasts; elsewhere the engine computes in float32.
AUTOCAST_DEVICE_TYPES: tuple[str, ...] = ("cuda",)
#: The first loss scale of float16 training (GradScaler's default).
INITIAL_LOSS_SCALE = 2.0**16
#: torch_dtype -> the dtype the forward and backward compute in where autocast applies.
COMPUTE_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}


class Precision:
    """The compute precision of one run on one device (see the module docstring)."""

    def __init__(self, torch_dtype: str, device: torch.device):
        if torch_dtype not in COMPUTE_DTYPES:
            raise ConfigError(
                "torch_dtype", f"expected one of {', '.join(COMPUTE_DTYPES)}, got {torch_dtype!r}"
            )
        self.torch_dtype = torch_dtype
        self.device_type = device.type
        wanted = COMPUTE_DTYPES[torch_dtype]
        autocasts = wanted != torch.float32 and device.type in AUTOCAST_DEVICE_TYPES
        #: What the forward and backward compute in.
        self.compute_dtype = wanted if autocasts else torch.float32
        #: Dynamic loss scaling, for float16 only.
        self.scaler = (
            torch.amp.GradScaler(device.type, init_scale=INITIAL_LOSS_SCALE)
            if self.compute_dtype == torch.float16
            else None
        )

    @property
    def note(self) -> str | None:
        """Why the computation is float32 when a reduced precision was asked for."""
        if self.compute_dtype == COMPUTE_DTYPES[self.torch_dtype]:
            return None
        return f"torch_dtype {self.torch_dtype}: no GPU, so computing in float32"

    @property
    def reduced(self) -> bool:
        """Whether the forward runs in a 16-bit dtype."""
        return self.compute_dtype != torch.float32

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The context every forward runs in (training, the DPO reference pass, the eval loss)."""
        if not self.reduced:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.compute_dtype)

    @property
    def loss_scale(self) -> float | None:
        """The scale the current step's loss is multiplied by (None without loss scaling)."""
        return self.scaler.get_scale() if self.scaler is not None else None

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss``, scaled when loss scaling is on."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Turn the gradients back into true gradients; call once per step, before reading them."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """The optimizer step, unless the scaled gradients overflowed; True when the step was taken."""
        if self.scaler is None:
            optimizer.step()
            return True
        scale = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return not self.scaler.get_scale() < scale  # the scale only drops after an overflow

    def state_dict(self) -> dict[str, Any] | None:
        """The loss scaler's state, for resumable checkpoints (None without loss scaling)."""
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def finite_or_none(value: float) -> float | None:
    """``value``, or None for inf and NaN (a gradient norm of an overflowed step), which JSON cannot hold."""
    return value if math.isfinite(value) else None
