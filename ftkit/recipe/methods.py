"""Recipe sections of the method families (pydantic; no torch or peft imported here).

Each class is one `method:` section: its fields are the recipe keys (type, default,
description), its docstring's first line is the method's formula, `summary` is the
line `ftkit methods` shows. Key names follow ftkit's vocabulary across families
(`r`, `alpha`, `dropout`, `target_modules`), not each peft class's own spelling.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from ftkit.recipe.peft_types import is_prompt_learning, problems


class MethodConfig(BaseModel):
    """Base of every `method:` section. Subclasses set `name: Literal[...]`."""

    model_config = ConfigDict(extra="forbid")

    #: learning rate used when `train.lr` is not given
    default_lr: ClassVar[float] = 1e-4
    #: where `default_lr` comes from, quoted in the note `ftkit validate` prints
    default_lr_reason: ClassVar[str] = "adapters 1e-4: Anyscale Llama-2 fine-tuning study"
    #: one-line description shown by `ftkit methods`
    summary: ClassVar[str] = ""
    #: True when the result is a PEFT adapter (saved as adapter_config.json + weights)
    is_adapter: ClassVar[bool] = True
    #: True when the method needs the base model quantized to 4 bits
    needs_4bit: ClassVar[bool] = False
    #: True when the method trains quantized weights directly (impossible)
    trains_base_weights: ClassVar[bool] = False
    #: True when the adapter can be folded into the base weights (`merge_and_unload`);
    #: prompt methods add virtual tokens, which no weight matrix can hold
    mergeable: ClassVar[bool] = True

    def recipe_problems(self, recipe: Any) -> list[str]:
        """Problems this method has with the rest of the recipe, one `key.path: what to do` line each.

        Called once the whole recipe validated, so a method can check what lives in
        other sections (e.g. that its init needs a 4-bit base). Default: none.
        """
        return []


_TARGETS = "Linear modules that get adapters: all-linear (not lm_head) or a list of names (e.g. [q_proj, v_proj])."
_SAVED = "Modules trained in full and saved with the adapter (e.g. [lm_head, embed_tokens])."


def _non_empty_targets(value: object) -> object:
    if isinstance(value, list) and not value:
        raise ValueError("must name at least one module, or be all-linear")
    return value


TargetModules = Annotated[Literal["all-linear"] | list[str], AfterValidator(_non_empty_targets)]


class FullConfig(MethodConfig):
    """Train every weight of the model."""

    name: Literal["full"] = "full"
    default_lr: ClassVar[float] = 1e-5
    default_lr_reason: ClassVar[str] = "full fine-tuning 1e-5: Anyscale Llama-2 fine-tuning study"
    summary: ClassVar[str] = "full fine-tuning: every weight trains"
    is_adapter: ClassVar[bool] = False
    trains_base_weights: ClassVar[bool] = True
    mergeable: ClassVar[bool] = False


class FreezeConfig(MethodConfig):
    """Freeze the first layers and train the last `trainable_layers` decoder layers."""

    name: Literal["freeze"] = "freeze"
    trainable_layers: int = Field(2, ge=0, description="Number of last decoder layers that train.")
    trainable_modules: list[str] = Field(
        default_factory=list,
        description="Extra modules that train, by name suffix (e.g. [lm_head, model.norm]).",
    )
    default_lr: ClassVar[float] = 1e-5
    default_lr_reason: ClassVar[str] = "full fine-tuning 1e-5: Anyscale Llama-2 fine-tuning study"
    summary: ClassVar[str] = "partial fine-tuning: first layers frozen, the last N train"
    is_adapter: ClassVar[bool] = False
    trains_base_weights: ClassVar[bool] = True
    mergeable: ClassVar[bool] = False


# ---------------------------------------------------------------- LoRA family (peft LoraConfig)


class LoraConfig(MethodConfig):
    """Low-rank adapters: W' = W + (alpha / r) · B A, with A ∈ R^{r×in}, B ∈ R^{out×r}, B = 0 at start."""

    name: Literal["lora"] = "lora"
    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: float = Field(32, gt=0, description="Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train.")
    target_modules: TargetModules = Field("all-linear", description=_TARGETS)
    modules_to_save: list[str] | None = Field(None, description=_SAVED)
    init: Literal["kaiming", "gaussian", "pissa", "olora", "loftq"] = Field(
        "kaiming",
        description=(
            "How A and B start. kaiming: A Kaiming-uniform, B = 0 (starts at the base model); "
            "gaussian: A ~ N(0, 1/r), B = 0; pissa: B A = the top-r singular part of W, W keeps the rest; "
            "olora: B A from a QR decomposition of W, W keeps the rest; "
            "loftq: B A cancels the 4-bit quantization error of W (4-bit base only, CUDA GPU)."
        ),
    )
    init_svd_iters: int | None = Field(
        None,
        ge=1,
        description="pissa only: randomized SVD with this many subspace iterations (fast on big models); "
        "null = exact SVD.",
    )
    summary: ClassVar[str] = "LoRA: low-rank adapters on a frozen 16/32-bit base"
    #: extra peft.LoraConfig arguments that define a named variant (use_dora, use_rslora)
    peft_flags: ClassVar[dict[str, Any]] = {}

    @model_validator(mode="after")
    def _svd_iters_need_pissa(self) -> LoraConfig:
        if self.init_svd_iters is not None and self.init != "pissa":
            raise ValueError(f"method.init_svd_iters: only used by init pissa; init here is {self.init}")
        return self

    def recipe_problems(self, recipe: Any) -> list[str]:
        quantized, dora = recipe.model.quantization is not None, bool(self.peft_flags.get("use_dora"))
        problems = []
        if self.init in ("pissa", "olora") and quantized:
            problems.append(
                f"method.init: {self.init} moves part of W into the adapter and leaves W − BA in the base, "
                "which cannot be 4-bit; use init kaiming on a 4-bit base, or drop model.quantization"
            )
        if self.init in ("pissa", "olora") and dora:
            problems.append(
                f"method.init: {self.init} with DoRA is not supported: final/ is saved as a plain LoRA on the "
                "original base (ΔW = BA − B₀A₀), which has no place for DoRA's magnitude; use method.name: lora"
            )
        if self.init == "loftq" and not quantized:
            problems.append(
                "method.init: loftq sets B A to cancel the 4-bit quantization error of W, so it needs a 4-bit "
                "base; use method.name: qlora"
            )
        if self.init == "loftq" and dora:
            problems.append(
                "method.init: loftq with DoRA is not supported: DoRA's magnitude is fixed before LoftQ sets "
                "B A; use method.name: qlora, or init kaiming"
            )
        return problems


class QloraConfig(LoraConfig):
    """LoRA on a 4-bit NF4 base (QLoRA, Dettmers et al. 2023)."""

    name: Literal["qlora"] = "qlora"  # type: ignore[assignment]
    summary: ClassVar[str] = "QLoRA: LoRA on a 4-bit NF4-quantized base"
    needs_4bit: ClassVar[bool] = True


class DoraConfig(LoraConfig):
    """DoRA (Liu et al. 2024): W' = m · (W + s·B A) / ‖W + s·B A‖_c, with the magnitude m ∈ R^{out} trained too."""

    name: Literal["dora"] = "dora"  # type: ignore[assignment]
    summary: ClassVar[str] = "DoRA: LoRA on the direction of W plus a trained per-row magnitude"
    peft_flags: ClassVar[dict[str, Any]] = {"use_dora": True}


class QdoraConfig(DoraConfig):
    """QDoRA: DoRA on a 4-bit NF4 base (the norm is taken of the dequantized W)."""

    name: Literal["qdora"] = "qdora"  # type: ignore[assignment]
    summary: ClassVar[str] = "QDoRA: DoRA on a 4-bit NF4-quantized base"
    needs_4bit: ClassVar[bool] = True


class RsloraConfig(LoraConfig):
    """rsLoRA (Kalajdzievski 2023): W' = W + (alpha / √r) · B A, so large ranks keep learning."""

    name: Literal["rslora"] = "rslora"  # type: ignore[assignment]
    summary: ClassVar[str] = "rsLoRA: LoRA scaled by alpha/sqrt(r), stable at high rank"
    peft_flags: ClassVar[dict[str, Any]] = {"use_rslora": True}


class LoraPlusConfig(LoraConfig):
    """LoRA+ (Hayou et al. 2024): LoRA whose B learns `lr_ratio` times faster than A: η_B = λ · η_A."""

    name: Literal["lora_plus"] = "lora_plus"  # type: ignore[assignment]
    lr_ratio: float = Field(
        16.0, ge=1.0, description="λ = η_B / η_A; train.lr is A's LR. The paper recommends 2^4 = 16."
    )
    summary: ClassVar[str] = "LoRA+: LoRA with B's learning rate lr_ratio × A's"


class LoraFaConfig(LoraConfig):
    """LoRA-FA (Zhang et al. 2023): A frozen at its random init, only B trains: ΔW = s · B A₀."""

    name: Literal["lora_fa"] = "lora_fa"  # type: ignore[assignment]
    projected_gradient: bool = Field(
        True,
        description="Update B with peft's LoRA-FA optimizer, which projects B's gradient as "
        "(1/s²) · g_B (A Aᵀ)⁻¹ to follow full fine-tuning (train.optimizer must be adamw); "
        "false = plain train.optimizer on B.",
    )
    summary: ClassVar[str] = "LoRA-FA: A frozen at init, only B trains (less activation memory)"

    def recipe_problems(self, recipe: Any) -> list[str]:
        problems = super().recipe_problems(recipe)
        if self.projected_gradient and recipe.train.optimizer != "adamw":
            problems.append(
                f"method.projected_gradient: peft's LoRA-FA optimizer is an AdamW, not {recipe.train.optimizer}; "
                "set train.optimizer: adamw, or method.projected_gradient: false"
            )
        return problems


class DeltaLoraConfig(LoraConfig):
    """Delta-LoRA (Zi et al. 2023): LoRA whose frozen W also follows the adapter: after each step n > K,
    W += λ · s · (B_n A_n − B_{n−1} A_{n−1}), so W_n = W_0 + λ · s · (B_n A_n − B_K A_K)."""

    name: Literal["delta_lora"] = "delta_lora"  # type: ignore[assignment]
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input: must be 0 (Delta-LoRA removes it)."
    )
    update_ratio: float = Field(
        0.5, gt=0.0, description="λ: how much of each step's change of the adapter W takes on as well."
    )
    start_step: int = Field(
        0, ge=0, description="K: W follows the adapter from optimizer step K on (plain LoRA before)."
    )
    init: Literal["kaiming", "gaussian"] = Field(  # type: ignore[assignment]
        "kaiming",
        description="How A and B start (B = 0 either way). kaiming: A Kaiming-uniform; gaussian: A ~ N(0, 1/r). "
        "PiSSA/OLoRA/LoftQ inits move W into the adapter, which W's update is not defined for.",
    )
    summary: ClassVar[str] = "Delta-LoRA: LoRA whose frozen weights also move by λ × the adapter's change"

    @model_validator(mode="after")
    def _no_dropout_no_bias(self) -> DeltaLoraConfig:
        if self.dropout:
            raise ValueError(
                f"method.dropout: delta_lora needs 0 (got {self.dropout}): the paper removes dropout so that the "
                "adapter's gradient is the gradient W would get, which the update of W relies on"
            )
        if self.bias != "none":
            raise ValueError("method.bias: delta_lora moves W by the adapter's B A only; use bias: none")
        return self


class LoraDropConfig(LoraConfig):
    """LoRA-drop (Zhou et al. 2024): a short LoRA run on a data sample scores each layer by
    g_i = mean over tokens of Σ_modules ‖ΔW_i x‖²; the layers holding `threshold` of Σ g keep their own
    LoRA, the others share one LoRA per module type; then training starts again from the init."""

    name: Literal["lora_drop"] = "lora_drop"  # type: ignore[assignment]
    sample_fraction: float = Field(
        0.1, gt=0.0, le=1.0, description="Fraction of the training examples the scoring run trains and scores on."
    )
    sample_steps: int = Field(20, ge=1, description="Optimizer steps of the scoring run (train.lr, constant).")
    threshold: float = Field(
        0.9,
        gt=0.0,
        le=1.0,
        description="Keep the most important layers until their share of the total importance reaches this.",
    )
    init: Literal["kaiming", "gaussian"] = Field(  # type: ignore[assignment]
        "kaiming",
        description="How A and B start (B = 0 either way). kaiming: A Kaiming-uniform; gaussian: A ~ N(0, 1/r). "
        "PiSSA/OLoRA/LoftQ inits derive each adapter from its own layer's W, which a shared adapter cannot.",
    )
    summary: ClassVar[str] = "LoRA-drop: own LoRA on the layers whose LoRA output matters, one shared LoRA elsewhere"

    def recipe_problems(self, recipe: Any) -> list[str]:
        problems = super().recipe_problems(recipe)
        if recipe.distributed.strategy in ("fsdp", "deepspeed"):
            problems.append(
                f"method.name: lora_drop ties one adapter to several decoder layers, which distributed.strategy "
                f"{recipe.distributed.strategy} shards one layer at a time; use distributed.strategy: ddp"
            )
        return problems


#: the attention projections LongLoRA adapts (Llama naming, as in the paper's code)
_ATTENTION_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj"]


class LongloraConfig(LoraConfig):
    """LongLoRA (Chen et al. 2023): LoRA on attention + trained embeddings and norms, with shifted sparse
    attention (S²-Attn: groups of G tokens, half the heads shifted by G/2) in training and full attention at
    inference; optional linear RoPE position interpolation to extend the context."""

    name: Literal["longlora"] = "longlora"  # type: ignore[assignment]
    target_modules: TargetModules = Field(
        default_factory=lambda: list(_ATTENTION_PROJECTIONS),
        description="Linear modules that get adapters; the paper adapts attention only: [q_proj, k_proj, v_proj, "
        "o_proj] (all-linear or other names allowed).",
    )
    group_size_ratio: float = Field(
        0.25,
        gt=0.0,
        le=1.0,
        description="S²-Attn group size G as a fraction of data.max_length (the paper's 1/4): each token attends to "
        "its group of G tokens; rows no longer than G get full attention.",
    )
    trainable_embeddings: bool = Field(
        True, description="Train the input embeddings in full (saved with the adapter); the paper finds it needed."
    )
    trainable_norms: bool = Field(
        True, description="Train every normalization layer (saved with the adapter); the paper finds it needed."
    )
    rope_scaling_factor: float | None = Field(
        None,
        gt=1.0,
        description="Position interpolation: linear RoPE scaling by this factor (positions divided by it), set "
        "in the model config before the weights load; the run's base/ keeps that config, so final/ + base/ "
        "reproduce it. null = the model's own RoPE.",
    )
    summary: ClassVar[str] = "LongLoRA: LoRA + trained embeddings/norms, shifted sparse attention in training"

    def group_size(self, max_length: int) -> int:
        """G = group_size_ratio × max_length, rounded down to an even number (the shift is G/2), at least 2."""
        return max(2, int(self.group_size_ratio * max_length) // 2 * 2)

    def recipe_problems(self, recipe: Any) -> list[str]:
        problems = super().recipe_problems(recipe)
        if recipe.model.attn_implementation != "sdpa":
            problems.append(
                f"model.attn_implementation: longlora computes attention with sdpa (S²-Attn in training, full "
                f"attention in evaluation), not {recipe.model.attn_implementation}; set model.attn_implementation: sdpa"
            )
        if self.rope_scaling_factor is not None and recipe.model.quantization is not None:
            problems.append(
                "method.rope_scaling_factor: the run writes base/ with the interpolated config and the base's "
                "weights, which ftkit does not do for a 4-bit base; remove model.quantization or the scaling factor"
            )
        if int(self.group_size_ratio * recipe.data.max_length) < 2:
            problems.append(
                f"method.group_size_ratio: {self.group_size_ratio} × data.max_length {recipe.data.max_length} is "
                "below 2 tokens per group; raise it"
            )
        return problems


# ---------------------------------------------------------------- other weight adapters


class VeraConfig(MethodConfig):
    """VeRA (Kopiczko et al. 2024): ΔW = Λ_b B Λ_d A, with A, B random, frozen and shared by all layers;
    only the vectors b ∈ R^{out} and d ∈ R^{r} train."""

    name: Literal["vera"] = "vera"
    r: int = Field(256, ge=1, description="Rank of the shared random projections (large: only r + out values train).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    d_initial: float = Field(0.1, gt=0.0, description="Initial value of every entry of d.")
    projection_seed: int = Field(0, description="Seed of the shared random A and B.")
    save_projection: bool = Field(
        True, description="Save A and B with the adapter (larger file; no dependence on the RNG when loading)."
    )
    target_modules: TargetModules = Field("all-linear", description=_TARGETS)
    modules_to_save: list[str] | None = Field(None, description=_SAVED)
    default_lr: ClassVar[float] = 1e-3
    default_lr_reason: ClassVar[str] = "VeRA trains scaling vectors only and takes ~10× LoRA's LR, Kopiczko et al. 2024"
    summary: ClassVar[str] = "VeRA: frozen shared random matrices, trained scaling vectors"


class AdaloraConfig(MethodConfig):
    """AdaLoRA (Zhang et al. 2023): ΔW = P Λ Q (SVD form), with the rank budget Σ rᵢ cut from init_r to
    target_r per layer during training by importance scores (the loop calls peft's update every step)."""

    name: Literal["adalora"] = "adalora"
    init_r: int = Field(12, ge=1, description="Starting rank of every adapted layer.")
    target_r: int = Field(8, ge=1, description="Average rank per layer left after the budget is cut.")
    alpha: float = Field(32, gt=0, description="Scaling numerator: the update is scaled by alpha / current rank.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    tinit: int = Field(0, ge=0, description="Steps at the full init_r budget before cutting starts.")
    tfinal: int = Field(0, ge=0, description="Last steps trained at the final budget (no more reallocation).")
    delta_t: int = Field(1, ge=1, description="Reallocate the budget every delta_t steps.")
    beta1: float = Field(0.85, gt=0.0, lt=1.0, description="EMA coefficient of the importance (sensitivity) scores.")
    beta2: float = Field(0.85, gt=0.0, lt=1.0, description="EMA coefficient of their uncertainty.")
    orth_reg_weight: float = Field(
        0.5, ge=0.0, description="Weight of the orthogonality penalty ‖PᵀP − I‖ + ‖QQᵀ − I‖ added to the loss."
    )
    target_modules: TargetModules = Field("all-linear", description=_TARGETS)
    modules_to_save: list[str] | None = Field(None, description=_SAVED)
    summary: ClassVar[str] = "AdaLoRA: SVD-form LoRA whose rank budget moves to the layers that need it"

    @model_validator(mode="after")
    def _target_below_init(self) -> AdaloraConfig:
        if self.target_r > self.init_r:
            raise ValueError(f"method.target_r: {self.target_r} is above init_r {self.init_r}; the budget only shrinks")
        return self


class Ia3Config(MethodConfig):
    """(IA)³ (Liu et al. 2022): h = l ⊙ (W x) on attention keys/values, h = W (l ⊙ x) on feed-forward
    layers; only the vectors l (init 1) train."""

    name: Literal["ia3"] = "ia3"
    target_modules: TargetModules | None = Field(
        None,
        description="Modules whose activations are rescaled; null = peft's choice for the architecture "
        "(Llama: k_proj, v_proj, down_proj).",
    )
    feedforward_modules: list[str] | None = Field(
        None,
        description="Those of target_modules rescaled on their input (feed-forward); null = peft's choice "
        "(Llama: down_proj).",
    )
    modules_to_save: list[str] | None = Field(None, description=_SAVED)
    default_lr: ClassVar[float] = 3e-3
    default_lr_reason: ClassVar[str] = "(IA)³ 3e-3: Liu et al. 2022, T-Few"
    summary: ClassVar[str] = "(IA)³: learned vectors rescale keys, values and feed-forward activations"

    @model_validator(mode="after")
    def _feedforward_among_targets(self) -> Ia3Config:
        targets, ff = self.target_modules, self.feedforward_modules
        if ff is not None and isinstance(targets, list):
            outside = [m for m in ff if m not in targets]
            if outside:
                raise ValueError(
                    f"method.feedforward_modules: {', '.join(outside)} not in method.target_modules; "
                    "feed-forward modules are a subset of the targets"
                )
        return self


class LohaConfig(MethodConfig):
    """LoHa (Hyeon-Woo et al. 2022, FedPara): ΔW = (alpha / r) · (B₁A₁) ⊙ (B₂A₂), rank up to r² from 2r(in+out)
    parameters."""

    name: Literal["loha"] = "loha"
    r: int = Field(8, ge=1, description="Rank of each of the two factors.")
    alpha: float = Field(16, gt=0, description="Scaling numerator: the update is scaled by alpha / r.")
    rank_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout over the rank dimension in training.")
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Probability of skipping a whole adapter per step.")
    target_modules: TargetModules = Field("all-linear", description=_TARGETS)
    modules_to_save: list[str] | None = Field(None, description=_SAVED)
    summary: ClassVar[str] = "LoHa: Hadamard product of two low-rank updates (LyCORIS)"


class LokrConfig(MethodConfig):
    """LoKr (Edalati et al. 2022, LyCORIS): ΔW = (alpha / r) · C ⊗ (B A), a Kronecker product of a small
    full matrix and a low-rank one."""

    name: Literal["lokr"] = "lokr"
    r: int = Field(8, ge=1, description="Rank of the low-rank Kronecker factor.")
    alpha: float = Field(16, gt=0, description="Scaling numerator: the update is scaled by alpha / r.")
    rank_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout over the rank dimension in training.")
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Probability of skipping a whole adapter per step.")
    decompose_both: bool = Field(False, description="Also factor the small Kronecker matrix C in low rank.")
    decompose_factor: int = Field(
        -1, description="Size factor of the Kronecker split of each dimension; -1 = as square as possible."
    )
    target_modules: TargetModules = Field("all-linear", description=_TARGETS)
    modules_to_save: list[str] | None = Field(None, description=_SAVED)
    summary: ClassVar[str] = "LoKr: Kronecker product of a small matrix and a low-rank one (LyCORIS)"


# ---------------------------------------------------------------- prompt family (frozen model, learned inputs)


class PromptTuningConfig(MethodConfig):
    """Prompt tuning (Lester et al. 2021): n trained embeddings P ∈ R^{n×d} are prepended to every input;
    the model itself is untouched."""

    name: Literal["prompt_tuning"] = "prompt_tuning"
    num_virtual_tokens: int = Field(20, ge=1, description="Number of trained prompt embeddings n.")
    init: Literal["random", "text"] = Field(
        "random", description="random, or text: start from the embeddings of init_text's tokens (repeated to n)."
    )
    init_text: str | None = Field(None, description="Text whose token embeddings start the prompt (init: text).")
    default_lr: ClassVar[float] = 3e-2
    default_lr_reason: ClassVar[str] = "prompt embeddings take a far higher LR than weights; Lester et al. use 0.3"
    summary: ClassVar[str] = "prompt tuning: trained virtual-token embeddings prepended to the input"
    mergeable: ClassVar[bool] = False

    @model_validator(mode="after")
    def _text_goes_with_init_text(self) -> PromptTuningConfig:
        if self.init == "text" and not self.init_text:
            raise ValueError("method.init_text: required when method.init is text")
        if self.init == "random" and self.init_text is not None:
            raise ValueError("method.init_text: only used when method.init is text; set init: text or remove it")
        return self


class PrefixTuningConfig(MethodConfig):
    """Prefix tuning (Li & Liang 2021): every attention layer attends to n trained key/value pairs before
    the input: Attn(q, [P_k; K], [P_v; V])."""

    name: Literal["prefix_tuning"] = "prefix_tuning"
    num_virtual_tokens: int = Field(20, ge=1, description="Number of trained prefix positions n per layer.")
    projection: bool = Field(
        False, description="Reparameterise the prefixes through a 2-layer MLP (the paper's stabiliser)."
    )
    encoder_hidden_size: int | None = Field(
        None, ge=1, description="Hidden size of that MLP (projection: true); null = the model's hidden size."
    )
    default_lr: ClassVar[float] = 1e-2
    default_lr_reason: ClassVar[str] = "prefixes are inputs, not weights, and take a far higher LR than LoRA"
    summary: ClassVar[str] = "prefix tuning: trained key/value prefixes in every attention layer"
    mergeable: ClassVar[bool] = False

    @model_validator(mode="after")
    def _hidden_size_needs_projection(self) -> PrefixTuningConfig:
        if self.encoder_hidden_size is not None and not self.projection:
            raise ValueError("method.encoder_hidden_size: only used with method.projection: true")
        return self


class PTuningConfig(MethodConfig):
    """P-tuning (Liu et al. 2021): prompt embeddings produced by a small encoder, P = f(E), f an MLP or an
    LSTM, prepended to every input."""

    name: Literal["p_tuning"] = "p_tuning"
    num_virtual_tokens: int = Field(20, ge=1, description="Number of virtual tokens n.")
    encoder: Literal["mlp", "lstm"] = Field("mlp", description="Prompt encoder: mlp (3 layers) or lstm (+ MLP head).")
    encoder_hidden_size: int | None = Field(
        None, ge=1, description="Hidden size of the encoder; null = the model's hidden size."
    )
    encoder_num_layers: int = Field(2, ge=1, description="LSTM layers (encoder: lstm); the MLP's depth is fixed.")
    encoder_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout inside the encoder.")
    default_lr: ClassVar[float] = 1e-3
    default_lr_reason: ClassVar[str] = "the prompt encoder is a small network trained from scratch"
    summary: ClassVar[str] = "P-tuning: virtual tokens produced by a trained MLP or LSTM encoder"
    mergeable: ClassVar[bool] = False

    @model_validator(mode="after")
    def _layers_need_lstm(self) -> PTuningConfig:
        if self.encoder_num_layers != 2 and self.encoder != "lstm":
            raise ValueError("method.encoder_num_layers: only used with method.encoder: lstm")
        return self


# ---------------------------------------------------------------- bottleneck adapters (ftkit's own module)


def _whole_model_problems(method: str, recipe: Any) -> list[str]:
    """Bottleneck adapters save from the whole, unsharded model (ftkit.models.bottleneck.save)."""
    strategy = recipe.distributed.strategy
    if strategy == "ddp":
        return []
    return [
        f"distributed.strategy: method {method} saves its adapters from the whole model, which {strategy} splits "
        "over processes; use distributed.strategy: ddp"
    ]


class AdapterConfig(MethodConfig):
    """Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020): h' = h + W_up · act(W_down · h), after
    attention and the MLP (houlsby) or the MLP only (pfeiffer); W_up = 0 at start; only adapters train."""

    name: Literal["adapter"] = "adapter"
    config: Literal["houlsby", "pfeiffer"] = Field(
        "pfeiffer",
        description="Where adapters sit in each decoder layer. houlsby: after the attention block and after the "
        "MLP; pfeiffer: after the MLP only (half the parameters).",
    )
    reduction_factor: float = Field(
        16, gt=0, description="Bottleneck width = hidden size / reduction_factor (AdapterHub's default 16)."
    )
    non_linearity: Literal["relu", "gelu", "swish"] = Field(
        "relu", description="Activation between the down- and up-projection."
    )
    modules_to_save: list[str] | None = Field(None, description=_SAVED)
    default_lr: ClassVar[float] = 1e-4
    default_lr_reason: ClassVar[str] = "bottleneck adapters 1e-4: AdapterHub's examples use 1e-4"
    summary: ClassVar[str] = "bottleneck adapters (Houlsby / Pfeiffer): small residual MLPs after attention and MLP"
    is_adapter: ClassVar[bool] = False  # final/ is ftkit's bottleneck format, not a peft adapter
    mergeable: ClassVar[bool] = False

    def recipe_problems(self, recipe: Any) -> list[str]:
        return _whole_model_problems(self.name, recipe)


class AdapterFusionConfig(MethodConfig):
    """AdapterFusion (Pfeiffer et al. 2021): N trained bottleneck adapters, frozen, combined per layer by a trained
    attention h' = h + Σ_i softmax_i(Q h · K f_i(h) / √d) · V f_i(h); only Q, K, V train."""

    name: Literal["adapter_fusion"] = "adapter_fusion"
    adapters: list[str] = Field(
        ...,
        min_length=2,
        description="Run directories of trained bottleneck-adapter runs (method.name: adapter) on this same base.",
    )
    default_lr: ClassVar[float] = 5e-5
    default_lr_reason: ClassVar[str] = "AdapterFusion 5e-5: Pfeiffer et al. 2021"
    summary: ClassVar[str] = "AdapterFusion: trained attention over several frozen bottleneck adapters"
    is_adapter: ClassVar[bool] = False
    mergeable: ClassVar[bool] = False

    def recipe_problems(self, recipe: Any) -> list[str]:
        return _whole_model_problems(self.name, recipe)


class LlamaAdapterConfig(MethodConfig):
    """LLaMA-Adapter (Zhang et al. 2023): the top adapter_layers attention layers also attend to adapter_len trained
    prompts, their attention scaled by a gate initialised at zero (peft AdaptionPromptConfig)."""

    name: Literal["llama_adapter"] = "llama_adapter"
    adapter_len: int = Field(10, ge=1, description="Number of trained prompt positions per adapted layer.")
    adapter_layers: int = Field(
        30, ge=1, description="How many of the top decoder layers get prompts; at most the model's layer count."
    )
    default_lr: ClassVar[float] = 9e-3
    default_lr_reason: ClassVar[str] = "LLaMA-Adapter 9e-3: Zhang et al. 2023 (base LR 9e-3 at batch 256)"
    summary: ClassVar[str] = "LLaMA-Adapter: zero-gated trained prompts in the top attention layers (peft)"
    mergeable: ClassVar[bool] = False


# ---------------------------------------------------------------- anything else peft ships


class GenericPeftConfig(MethodConfig):
    """Any peft tuner by its type: the other keys are that peft config class's own fields, checked against it."""

    model_config = ConfigDict(extra="allow")

    name: Literal["peft"] = "peft"
    type: str = Field(
        ...,
        description="peft tuner type, e.g. fourierft, oft, boft, hra, ln_tuning, vblora, randlora "
        "(`ftkit methods peft` lists them, `ftkit methods peft TYPE` their keys).",
    )
    summary: ClassVar[str] = "any other peft tuner by type (OFT, BOFT, FourierFT, HRA, LN tuning, VB-LoRA, ...)"

    @model_validator(mode="after")
    def _keys_fit_the_peft_config(self) -> GenericPeftConfig:
        found = problems(self.type, dict(self.model_extra or {}))
        if found:
            raise ValueError("\n".join(found))
        return self

    @property
    def options(self) -> dict[str, Any]:
        """The peft keys given in the recipe (everything besides name and type)."""
        return dict(self.model_extra or {})

    @property
    def mergeable(self) -> bool:  # type: ignore[override]
        return not is_prompt_learning(self.type)


# ---------------------------------------------------------------- mixture of experts


class LoraExpertsSection(BaseModel):
    """LoRA on every expert's MLP (peft target_parameters on Mixtral's fused expert tensors)."""

    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, ge=1, description="Adapter rank, per expert.")
    alpha: float = Field(16, gt=0, description="Scaling numerator: the update is scaled by alpha / r.")


class MoeRouterConfig(MethodConfig):
    """Train the routers of a mixture of experts: loss + aux_loss_coef · load-balancing loss (Switch/Mixtral)."""

    name: Literal["moe_router"] = "moe_router"
    aux_loss_coef: float = Field(
        0.02, ge=0.0, description="Weight of the router load-balancing loss added to the training loss (reg_loss)."
    )
    lora_experts: LoraExpertsSection | None = Field(
        None, description="Also train LoRA adapters on the experts ({r, alpha}); merged into final/."
    )
    default_lr: ClassVar[float] = 1e-3
    default_lr_reason: ClassVar[str] = "routers 1e-3: a few small linear layers from a fixed start (docs/moe.md)"
    summary: ClassVar[str] = "mixture of experts: train only the routers (optionally LoRA on the experts)"
    is_adapter: ClassVar[bool] = False
    trains_base_weights: ClassVar[bool] = True
    mergeable: ClassVar[bool] = False


# ---------------------------------------------------------------- Medusa (extra decoding heads)


class MedusaConfig(MethodConfig):
    """Medusa (Cai et al. 2024): K extra heads on the last hidden state h_t; head k (0-based) predicts
    token t+k+2 as W_k · ResBlocks_k(h_t), ResBlock(x) = x + SiLU(U x + b) with U zero-initialised and W_k
    starting from lm_head; loss = [base LM loss, base: lora only] + Σ_k decay^k · CE_k."""

    name: Literal["medusa"] = "medusa"
    heads: int = Field(4, ge=1, le=16, description="Number of Medusa heads K (head k predicts token t+k+2).")
    head_layers: int = Field(1, ge=1, description="Residual blocks per head before its vocabulary projection.")
    projection: Literal["own", "shared"] = Field(
        "own",
        description="own: each head has its own vocabulary projection, a trained copy of lm_head (the paper's); "
        "shared: every head reuses the frozen lm_head (far fewer trainable parameters).",
    )
    base: Literal["frozen", "lora"] = Field(
        "frozen",
        description="frozen: only the heads train (Medusa-1; outputs exactly the base's); lora: the base trains "
        "a LoRA too and keeps its own LM loss (Medusa-2).",
    )
    decay: float = Field(0.8, gt=0.0, le=1.0, description="Weight of head k's loss is decay^k (the paper's 0.8).")
    self_distill: bool = Field(
        False,
        description="Train on the base model's own greedy answers to the training prompts (generated once "
        "before training, cached in the run directory), as the paper recommends when the data is not the "
        "model's own.",
    )
    r: int = Field(16, ge=1, description="base: lora only: adapter rank.")
    alpha: float = Field(32, gt=0, description="base: lora only: scaling numerator (update scaled by alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="base: lora only: dropout on the adapter input.")
    target_modules: TargetModules = Field("all-linear", description="base: lora only. " + _TARGETS)
    default_lr: ClassVar[float] = 1e-3
    default_lr_reason: ClassVar[str] = "Medusa heads 1e-3: Cai et al. 2024 train the heads with lr 1e-3"
    summary: ClassVar[str] = "Medusa: extra heads that predict several tokens ahead, for speculative decoding"
    #: what `ftkit methods medusa` says about merging (it depends on `base`)
    merge_note: ClassVar[str] = (
        "base: lora only (ftkit merge folds the LoRA in and writes the heads beside it, DIR/medusa/); "
        "base: frozen has nothing to merge (the base is unchanged, the heads already stand alone)"
    )

    @property
    def mergeable(self) -> bool:  # type: ignore[override]
        return self.base == "lora"

    def recipe_problems(self, recipe: Any) -> list[str]:
        problems = []
        if recipe.task != "causal_lm" or recipe.objective.name != "sft":
            problems.append(
                f"objective.name: medusa trains its heads with next-token cross-entropy (objective.name: sft, "
                f"task: causal_lm), not {recipe.objective.name} / {recipe.task}; use sft, or another method"
            )
        if recipe.data.packing:
            problems.append(
                "data.packing: medusa's heads predict tokens several positions ahead, which packing would take "
                "from the next example; set data.packing: false"
            )
        return problems


#: every `method:` section, in the order `ftkit methods` lists them (ftkit.methods registers each)
METHOD_CONFIGS: tuple[type[MethodConfig], ...] = (
    FullConfig,
    FreezeConfig,
    LoraConfig,
    QloraConfig,
    DoraConfig,
    QdoraConfig,
    RsloraConfig,
    LoraPlusConfig,
    LoraFaConfig,
    DeltaLoraConfig,
    LoraDropConfig,
    LongloraConfig,
    VeraConfig,
    AdaloraConfig,
    Ia3Config,
    LohaConfig,
    LokrConfig,
    PromptTuningConfig,
    PrefixTuningConfig,
    PTuningConfig,
    GenericPeftConfig,
    AdapterConfig,
    AdapterFusionConfig,
    LlamaAdapterConfig,
    MoeRouterConfig,
    MedusaConfig,
)
