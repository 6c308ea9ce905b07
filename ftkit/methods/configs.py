"""Recipe sections of the method families (pydantic; no torch here)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator

from ftkit.methods.base import MethodConfig


class FullConfig(MethodConfig):
    """Train every weight of the model."""

    name: Literal["full"] = "full"
    default_lr: ClassVar[float] = 1e-5
    summary: ClassVar[str] = "full fine-tuning: every weight trains"
    is_adapter: ClassVar[bool] = False
    trains_base_weights: ClassVar[bool] = True


class FreezeConfig(MethodConfig):
    """Freeze the first layers and train the last `trainable_layers` decoder layers."""

    name: Literal["freeze"] = "freeze"
    trainable_layers: int = Field(2, ge=0, description="Number of last decoder layers that train.")
    trainable_modules: list[str] = Field(
        default_factory=list,
        description="Extra modules that train, by name suffix (e.g. [lm_head, model.norm]).",
    )
    default_lr: ClassVar[float] = 1e-5
    summary: ClassVar[str] = "partial fine-tuning: first layers frozen, the last N train"
    is_adapter: ClassVar[bool] = False
    trains_base_weights: ClassVar[bool] = True


class LoraConfig(MethodConfig):
    """Low-rank adapters: W' = W + (alpha / r) · B A, with A ∈ R^{r×in}, B ∈ R^{out×r}, B = 0 at start."""

    name: Literal["lora"] = "lora"
    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: float = Field(32, gt=0, description="Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train.")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="Linear modules that get adapters: all-linear (not lm_head) or a list of names."
    )
    modules_to_save: list[str] | None = Field(
        None, description="Modules trained in full and saved with the adapter (e.g. [lm_head, embed_tokens])."
    )
    summary: ClassVar[str] = "LoRA: low-rank adapters on a frozen 16/32-bit base"

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value: object) -> object:
        if isinstance(value, list) and not value:
            raise ValueError("must name at least one module, or be all-linear")
        return value


class QloraConfig(LoraConfig):
    """LoRA on a 4-bit NF4 base (QLoRA, Dettmers et al. 2023)."""

    name: Literal["qlora"] = "qlora"  # type: ignore[assignment]
    summary: ClassVar[str] = "QLoRA: LoRA on a 4-bit NF4-quantized base"
    needs_4bit: ClassVar[bool] = True
