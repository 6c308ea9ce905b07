"""The recipe schema: every key a recipe may hold, with its type, default and meaning.

This file *is* the recipe reference: `scripts/gen_recipe_reference.py` renders
the README's table from it, and `ftkit validate` checks recipes against it.
Every section forbids unknown keys, so a typo is an error, never a silent default.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from ftkit.methods import method_configs

Dtype = Literal["auto", "float32", "bfloat16", "float16"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)


class Quantization(Section):
    """4-bit weight quantization of the base model through bitsandbytes (QLoRA)."""

    bits: Literal[4] = Field(4, description="Bits per base weight; 4 is what QLoRA uses.")
    type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type; NF4 suits normally distributed weights.")
    double_quant: bool = Field(True, description="Also quantize the quantization constants (saves ~0.4 bit/param).")
    compute_dtype: Dtype = Field(
        "auto", description="Dtype of the matmuls on dequantized weights; auto = bfloat16 on a bf16 GPU, else float32."
    )


class ModelSection(Section):
    """The base model and how it is loaded."""

    name: str = Field(
        "builtin:tiny-llama",
        description="Hub id, local directory, or a built-in model (builtin:tiny-llama, builtin:micro-llama).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of a hub model.")
    dtype: Dtype = Field(
        "auto", description="Dtype of the weights; auto = bfloat16 on a bf16-capable GPU, else float32."
    )
    quantization: Quantization | None = Field(
        None, description="Load the base in 4 bits (QLoRA). Filled with NF4 defaults when method.name is qlora."
    )
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with a hub model. Off unless you trust its authors."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel passed to transformers."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward: much less memory, ~30% more compute."
    )


MethodSection = Annotated[Union[tuple(method_configs())], Field(discriminator="name")]  # noqa: UP007


class DataSection(Section):
    """Where the examples come from and how they become tokens."""

    train: str = Field(..., description="Training data file (.jsonl, .json, .csv or .parquet).")
    val: str | None = Field(None, description="Validation data file; or use val_fraction.")
    val_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="Fraction of train held out for validation (seeded) when val is not given."
    )
    format: Literal["alpaca", "chat", "text"] = Field(
        "alpaca",
        description="alpaca: instruction/input/output; chat: messages (tokenizer's chat template); text: raw text.",
    )
    max_length: int = Field(
        1024, ge=8, description="Maximum tokens per example; longer ones are truncated and counted."
    )
    train_on_prompt: bool = Field(
        False, description="Also train on prompt tokens; by default only the completion is in the loss."
    )
    max_samples: int | None = Field(None, ge=1, description="Use at most this many training examples (first N).")

    @model_validator(mode="after")
    def _one_validation_source(self) -> DataSection:
        if self.val is not None and self.val_fraction > 0:
            raise ValueError("give either data.val or data.val_fraction, not both")
        return self


class TrainSection(Section):
    """The optimisation: steps, batch geometry, optimizer, schedule, cadence."""

    lr: float | None = Field(
        None,
        gt=0,
        description="Peak learning rate; default: the method's (1e-5 full/freeze, 1e-4 LoRA; `ftkit methods NAME`).",
    )
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to run; overrides epochs.")
    batch_size: int = Field(8, ge=1, description="Examples per micro-step (one forward/backward).")
    grad_accum: int = Field(1, ge=1, description="Micro-steps per optimizer step.")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = Field(
        "adamw", description="adamw (torch) or a bitsandbytes 8-bit / paged optimizer."
    )
    weight_decay: float = Field(0.0, ge=0.0, description="Decoupled weight decay (AdamW).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm to this; null disables.")
    scheduler: Literal["constant", "linear", "cosine"] = Field("cosine", description="LR decay after warmup.")
    warmup_steps: int | None = Field(None, ge=0, description="Linear warmup length in steps; overrides warmup_ratio.")
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0, description="Warmup as a fraction of all steps.")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Final LR as a fraction of lr (linear/cosine).")
    eval_every: int | None = Field(None, ge=1, description="Evaluate every N steps (and always at the end).")
    save_every: int | None = Field(None, ge=1, description="Write a resumable checkpoint every N steps.")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept (newest); the best by val_loss is kept too.")
    log_every: int = Field(1, ge=1, description="Write a metrics line every N steps.")
    seed: int = Field(42, description="Seed for initialisation, data order, dropout and the val split.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="Autocast precision; auto = bf16 on a bf16-capable GPU, else none."
    )
    samples: int = Field(3, ge=0, description="Validation prompts generated into report.md at the end.")


class Recipe(Section):
    """A complete fine-tuning recipe."""

    model: ModelSection = Field(default_factory=ModelSection, description="The base model.")
    method: MethodSection = Field(..., description="How the model is adapted (method.name picks the family).")
    data: DataSection = Field(..., description="The examples.")
    train: TrainSection = Field(default_factory=TrainSection, description="The optimisation.")
    output_dir: str | None = Field(None, description="Run directory; default runs/<recipe file name>.")

    #: defaults ftkit chose for the user, written as comments into the resolved recipe
    _notes: list[str] = PrivateAttr(default_factory=list)

    @property
    def notes(self) -> list[str]:
        return self._notes

    @model_validator(mode="after")
    def _quantization_fits_method(self) -> Recipe:
        method = self.method
        if self.model.quantization is not None and method.trains_base_weights:
            raise ValueError(
                f"method.name: {method.name} trains the base weights, which cannot be 4-bit; "
                "remove model.quantization or use method.name: qlora"
            )
        return self

    @model_validator(mode="after")
    def _fill_method_defaults(self) -> Recipe:
        if self.method.needs_4bit and self.model.quantization is None:
            self.model.quantization = Quantization()
            self._notes.append(f"model.quantization: NF4 4-bit defaults, because method.name is {self.method.name}")
        if self.train.lr is None:
            self.train.lr = type(self.method).default_lr
            self._notes.append(
                f"train.lr: {self.train.lr:g}, the default for method {self.method.name} "
                f"({type(self.method).default_lr_reason})"
            )
        return self

    @model_validator(mode="after")
    def _method_fits_recipe(self) -> Recipe:
        # after the defaults are filled: a method may depend on them (qlora's quantization)
        problems = self.method.recipe_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self
