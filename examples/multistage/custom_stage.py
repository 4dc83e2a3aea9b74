"""A custom stage: WiSE-FT weight interpolation (Wortsman et al. 2022, "Robust fine-tuning of zero-shot
models").

Fine-tuning can cost some of what the model knew before. Interpolating the weights of the fine-tuned model
with those of the model it started from, ``alpha * tuned + (1 - alpha) * base``, often keeps most of the gain
on the new task while recovering general ability. It costs one pass over the weights, no data, no GPU.

Use it after a training stage::

    # wise.yaml
    model_name_or_path: Qwen/Qwen2.5-1.5B-Instruct
    output_dir: ./runs/sft-wise
    stages: [sft, wise_ft]
    stage_configs:
      sft: {dataset_name_or_path: hf://HuggingFaceH4/no_robots}
      wise_ft: {alpha: 0.7}

    fnsft-pipeline --config wise.yaml --plugin examples/multistage/custom_stage.py

or from Python: import this module (it registers the stage) and run ``Pipeline.from_yaml("wise.yaml").run()``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from kfp_components.orchestration import Pipeline
from kfp_components.stages import BaseStage, StageConfig, StageResult
from kfp_components.typed_config import ConfigError


@dataclass(kw_only=True)
class WiseFTConfig(StageConfig):
    """Options of the wise_ft stage.

    Attributes:
        alpha: Weight of the fine-tuned model, in [0, 1]: 1.0 keeps it as it is, 0.0 gives back the base.
        base_model_name_or_path: The model to interpolate with (default: the model the previous stage
            started from, i.e. the weights before that fine-tuning).
    """

    alpha: float = 0.5
    base_model_name_or_path: str = ""

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError("alpha", f"must be in [0, 1], got {self.alpha}")


class WiseFTStage(BaseStage):
    """Interpolate the input model's weights with a base model's; save the result as a plain checkpoint."""

    stage_name: ClassVar[str] = "wise_ft"
    config_class: ClassVar[type[WiseFTConfig]] = WiseFTConfig

    config: WiseFTConfig

    def execute(self, model: str, tokenizer: str, previous_result: StageResult | None) -> StageResult:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        base = self.config.base_model_name_or_path or (previous_result.input_model if previous_result else "")
        if not base:
            raise ConfigError("base_model_name_or_path", "needed when no earlier stage ran before wise_ft")
        alpha = self.config.alpha
        self.log.info("%.2f x %s + %.2f x %s", alpha, model, 1 - alpha, base)

        # Models arrive as references: load them here, in full precision for the arithmetic.
        tuned = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        base_params = dict(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).named_parameters())
        squared_distance, squared_norm = 0.0, 0.0
        with torch.no_grad():
            for name, param in tuned.named_parameters():  # tied weights appear once
                other = base_params.get(name)
                if other is None or other.shape != param.shape:
                    raise ValueError(f"{base} does not match {model}: parameter {name!r} differs")
                squared_distance += float((param - other).pow(2).sum())
                squared_norm += float(other.pow(2).sum())
                param.mul_(alpha).add_(other, alpha=1 - alpha)
        del base_params

        out = Path(self.config.output_dir) / "final"
        shutil.rmtree(out, ignore_errors=True)  # never rewrite model files in place: final_model links them
        saved_dtype = getattr(AutoConfig.from_pretrained(model), "dtype", None) or torch.float32
        if isinstance(saved_dtype, str):
            saved_dtype = getattr(torch, saved_dtype)
        tuned.to(saved_dtype).save_pretrained(out)
        AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out)
        relative_distance = (squared_distance / max(squared_norm, 1e-12)) ** 0.5
        return StageResult(
            stage_name=self.name,
            model_path=str(out),
            metrics={
                "alpha": alpha,
                "relative_distance_to_base": relative_distance,  # ||tuned - base|| / ||base||, before mixing
                "relative_distance_after": alpha * relative_distance,
            },
            artifacts={"model": str(out)},
            input_model=model,
        )

    def dry_run(self, model: str, tokenizer: str) -> dict[str, object]:
        plan = super().dry_run(model, tokenizer)
        plan["interpolation"] = (
            f"{self.config.alpha} x input + {1 - self.config.alpha:g} x "
            f"{self.config.base_model_name_or_path or 'the previous stage input'}"
        )
        return plan


Pipeline.register_stage("wise_ft", WiseFTStage)
