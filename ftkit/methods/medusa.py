"""Medusa (Cai et al. 2024, "Medusa: Simple LLM Inference Acceleration Framework with Multiple Decoding Heads").

K extra heads read the base model's last hidden state h_t. Head k (0-based) guesses token t + k + 2
(the base's own lm_head guesses t + 1):

    head_k(h) = W_k · B_k^L(h),   B(x) = x + SiLU(U x + b),   U zero-initialised (each block starts as
                                                             the identity), W_k starting as lm_head

`projection: own` gives every head a trained copy of lm_head as W_k (the paper's); `shared` uses the
frozen lm_head itself, so only the blocks train (H² + H per block instead of H² + H + V·H per head).

Training (completion-only, like SFT; labels y, trained positions only):

    loss = [Σ_t CE(lm_head(h_t), y_{t+1})]  +  Σ_k decay^k · Σ_t CE(head_k(h_t), y_{t+k+2})
            only with base: lora (Medusa-2)

divided by the trained tokens of the window (the task's units). `base: frozen` (Medusa-1) trains the
heads alone, so decoding with them outputs exactly what the base would; `base: lora` trains a LoRA on the
base as well and keeps its LM loss. Metrics: `medusaK_loss` (head K's CE) and `medusaK_acc` (its top-1
hits), both per trained token.

The model the loop sees is `MedusaModel`: the base (a peft model with base: lora) and the heads. Its
`save_pretrained` writes FasterDecoding/Medusa's layout (`medusa_lm_head.safetensors`, `config.json` with
medusa_num_heads, medusa_num_layers, base_model_name_or_path, hidden_size, vocab_size), plus peft's
adapter files with base: lora; checkpoint.load_weights reads it back through `load_trained_weights`.
Checkpoints leave a shared projection out; final/ writes lm_head's weight into every head (the reference
code's layout has a projection per head). Decoding with the heads: ftkit.methods.medusa_decode.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from ftkit.data.encode import Example
from ftkit.errors import ModelError, RunDirError
from ftkit.io import messages
from ftkit.methods import lora
from ftkit.methods.base import MethodHooks, RunInfo
from ftkit.models.hf_files import ADAPTER_WEIGHTS
from ftkit.recipe.methods import LoraConfig, MedusaConfig
from ftkit.rundir import BASE, MEDUSA_CONFIG, MEDUSA_DISTILL, MEDUSA_HEADS

IGNORE = -100


class ResBlock(nn.Module):
    """x + SiLU(U x + b), U zero-initialised: the identity at the start (FasterDecoding/Medusa's ResBlock)."""

    def __init__(self, hidden_size: int, device: Any = None, dtype: Any = None):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size, device=device, dtype=dtype)
        nn.init.zeros_(self.linear.weight)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.linear(x))


class MedusaHeads(nn.Module):
    """`medusa_head[k]` = Sequential(ResBlock × layers[, Linear(H, V)]): the reference code's module names,
    so its state dict has the reference's keys (`k.j.linear.weight`, `k.layers.weight`)."""

    def __init__(self, lm_head: nn.Module, heads: int, layers: int, projection: str):
        super().__init__()
        weight = lm_head.weight
        vocab, hidden = weight.shape
        self.hidden_size, self.vocab_size, self.layers, self.projection = hidden, vocab, layers, projection
        self._lm_head = [lm_head]  # a list: the base's module, not registered (not saved, not trained here)
        blocks = []
        for _ in range(heads):
            modules: list[nn.Module] = [
                ResBlock(hidden, device=weight.device, dtype=weight.dtype) for _ in range(layers)
            ]
            if projection == "own":
                own = nn.Linear(hidden, vocab, bias=False, device=weight.device, dtype=weight.dtype)
                own.weight.data.copy_(weight.data)
                modules.append(own)
            blocks.append(nn.Sequential(*modules))
        self.medusa_head = nn.ModuleList(blocks)

    @property
    def num_heads(self) -> int:
        return len(self.medusa_head)

    def projection_weight(self, k: int) -> torch.Tensor:
        if self.projection == "own":
            return self.medusa_head[k][self.layers].weight
        return self._lm_head[0].weight

    def features(self, k: int, hidden: torch.Tensor) -> torch.Tensor:
        """Head k's residual blocks applied to hidden states (..., H)."""
        x = hidden.to(self.medusa_head[k][0].linear.weight.dtype)
        for j in range(self.layers):
            x = self.medusa_head[k][j](x)
        return x

    def logits(self, k: int, hidden: torch.Tensor) -> torch.Tensor:
        """Head k's logits (..., V) for hidden states (..., H)."""
        weight = self.projection_weight(k)
        return F.linear(self.features(k, hidden).to(weight.dtype), weight)

    def reference_state(self) -> dict[str, torch.Tensor]:
        """The state dict in the reference layout: a shared projection written into every head."""
        state = {name: t.detach().cpu().clone().contiguous() for name, t in self.medusa_head.state_dict().items()}
        if self.projection == "shared":
            shared = self._lm_head[0].weight.detach().cpu()
            for k in range(self.num_heads):
                state[f"{k}.{self.layers}.weight"] = shared.clone().contiguous()
        return state


def hf_model(model: Any) -> Any:
    """The transformers model (LoRA layers injected in place when the base is a peft model)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class MedusaModel(nn.Module):
    """The base model (transformers or peft) and its Medusa heads, as one module for the loop.

    forward / generate are the base's (what samples and evaluation of the base use); anything else
    not defined here is looked up on the base. `save_pretrained` and `load_trained_weights` read and
    write the heads (and the LoRA) in a run's final/ and checkpoints.
    """

    saves_trained_weights_only = True  # checkpoint size: only trained tensors are written

    def __init__(self, base: Any, heads: MedusaHeads, config: MedusaConfig, base_name: str | None = None):
        super().__init__()
        self.base = base
        self.medusa = heads
        self.method = config
        self.base_name = base_name

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.base.generate(*args, **kwargs)

    @property
    def has_lora(self) -> bool:
        return hasattr(self.base, "peft_config")

    @property
    def hf(self) -> Any:
        return hf_model(self.base)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states (B, T, H) of the base (with its LoRA) for a padded batch."""
        decoder = self.hf.get_decoder()
        return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    def medusa_config(self) -> dict[str, Any]:
        cfg = self.method
        return {
            "medusa_num_heads": cfg.heads,
            "medusa_num_layers": cfg.head_layers,
            "base_model_name_or_path": self.base_name or getattr(self.hf.config, "_name_or_path", None),
            "hidden_size": self.medusa.hidden_size,
            "vocab_size": self.medusa.vocab_size,
            "version": "2",
            "ftkit": {"projection": cfg.projection, "base": cfg.base, "decay": cfg.decay},
        }

    def save_pretrained(self, out_dir: str | Path, reference_layout: bool = False, **kwargs: Any) -> None:
        """medusa_lm_head.safetensors + config.json (+ peft's adapter files with base: lora).

        `reference_layout`: every head with its projection (final/); else only what trains (checkpoints)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.has_lora:
            self.base.save_pretrained(out, safe_serialization=True)
        if reference_layout:
            state = self.medusa.reference_state()
        else:
            state = {n: t.detach().cpu().clone().contiguous() for n, t in self.medusa.medusa_head.state_dict().items()}
        save_file(state, str(out / MEDUSA_HEADS), metadata={"format": "pt"})
        (out / MEDUSA_CONFIG).write_text(json.dumps(self.medusa_config(), indent=2) + "\n")

    def load_trained_weights(self, path: str | Path) -> None:
        """The heads (and the LoRA) saved by `save_pretrained` at `path`, in place; RunDirError when absent."""
        path = Path(path)
        load_heads(self.medusa, path)
        if self.has_lora:
            adapter = path / ADAPTER_WEIGHTS
            if not adapter.is_file():
                raise RunDirError(f"{path}: no {ADAPTER_WEIGHTS}, which a medusa run with base: lora saves")
            result = set_peft_model_state_dict(self.base, load_file(str(adapter)))
            if result.unexpected_keys:
                raise RunDirError(f"{adapter}: adapter tensors the model does not have: {result.unexpected_keys[:3]}")


def load_heads(heads: MedusaHeads, path: Path) -> None:
    """Heads from `path/medusa_lm_head.safetensors` (either layout) into `heads`, in place."""
    file = path / MEDUSA_HEADS
    if not file.is_file():
        raise RunDirError(f"{path}: no {MEDUSA_HEADS}; is this a medusa run?")
    tensors = load_file(str(file))
    wanted = heads.medusa_head.state_dict()
    missing = [name for name in wanted if name not in tensors]
    if missing:
        raise RunDirError(f"{file}: no tensor {missing[0]}; was it saved with these method.heads / head_layers?")
    bad = [n for n in wanted if tuple(tensors[n].shape) != tuple(wanted[n].shape)]
    if bad:
        got, want = tuple(tensors[bad[0]].shape), tuple(wanted[bad[0]].shape)
        raise RunDirError(f"{file}: {bad[0]} has shape {got}, not {want}; saved with other method.heads settings?")
    heads.medusa_head.load_state_dict({n: tensors[n] for n in wanted})


# ---------------------------------------------------------------- the method


def model_problems(config: MedusaConfig, model_config: Any) -> list[str]:
    if getattr(model_config, "is_encoder_decoder", False):
        return ["method.name: medusa needs a decoder-only causal LM"]
    return []


def _lora_config(config: MedusaConfig) -> LoraConfig:
    return LoraConfig(r=config.r, alpha=config.alpha, dropout=config.dropout, target_modules=config.target_modules)


def run_problems(config: MedusaConfig, skeleton: Any, run: RunInfo) -> list[str]:
    problems = []
    if skeleton.get_output_embeddings() is None:
        problems.append("method.name: medusa starts its heads from the model's lm_head, and this model has none")
    if config.base == "lora":
        problems += lora.run_problems(_lora_config(config), skeleton, run)
    return problems


def build(model: Any, config: MedusaConfig, base_name: str | None = None) -> MedusaModel:
    """The base (frozen, or with a fresh LoRA) and freshly initialised heads (used by apply and by loaders)."""
    if config.base == "lora":
        model = lora.apply(model, _lora_config(config), RunInfo())
    else:
        for param in model.parameters():
            param.requires_grad_(False)
    lm_head = hf_model(model).get_output_embeddings()
    heads = MedusaHeads(lm_head, config.heads, config.head_layers, config.projection)
    return MedusaModel(model, heads, config, base_name)


def apply(model: Any, config: MedusaConfig, run: RunInfo) -> Any:
    base_name = str((run.run_dir / BASE).resolve()) if run.run_dir is not None else None
    return build(model, config, base_name)


def hooks(model: MedusaModel, config: MedusaConfig, run: RunInfo) -> MethodHooks:
    distilled: dict[tuple[int, ...], Example] = {}
    if config.self_distill:
        distilled = self_distilled(model, run)

    def objective(task_objective: Any) -> Any:
        return MedusaObjective(task_objective, config, distilled)

    def save_final(trained: MedusaModel, out_dir: Path) -> None:
        if trained.base_name is None or not Path(trained.base_name).is_dir():
            trained.base_name = getattr(trained.hf.config, "_name_or_path", None)
        trained.save_pretrained(out_dir, reference_layout=True)

    return MethodHooks(objective=objective, save_final=save_final)


class MedusaObjective:
    """The task's SFT objective (its collate and units) with Medusa's loss (module docstring)."""

    reports_perplexity = False  # the loss sums several heads' cross-entropies

    def __init__(self, task_objective: Any, config: MedusaConfig, distilled: dict | None = None):
        self.inner, self.config, self.distilled = task_objective, config, distilled or {}
        self.name = task_objective.name

    def collate(self, examples: Any, pad_id: int) -> dict[str, torch.Tensor]:
        if self.distilled:
            examples = [self.distilled.get(prompt_key(ex), ex) for ex in examples]
        return self.inner.collate(examples, pad_id)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return self.inner.units(batch)

    def loss_sum(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        model = getattr(model, "module", model)  # DDP is refused (engines.check_method_hooks); compile wraps
        labels = batch["labels"]
        frozen = self.config.base == "frozen"
        with torch.no_grad() if frozen else contextlib.nullcontext():
            hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"])
        total = hidden.new_zeros((), dtype=torch.float32)
        metrics: dict[str, Any] = {}
        if not frozen:
            lm_head = model.hf.get_output_embeddings()
            target = labels[:, 1:]
            keep = target != IGNORE
            logits = lm_head(hidden[:, :-1][keep])
            lm = F.cross_entropy(logits.float(), target[keep], reduction="sum")
            total = total + lm
            metrics["lm_loss"] = lm.detach()
        heads = model.medusa
        for k, states, target in head_targets(hidden, labels, heads.num_heads):
            logits = heads.logits(k, states).float()
            ce = F.cross_entropy(logits, target, reduction="sum")
            total = total + (self.config.decay**k) * ce
            metrics[f"medusa{k}_loss"] = ce.detach()
            metrics[f"medusa{k}_acc"] = (logits.detach().argmax(-1) == target).sum()
        return total, metrics


def head_targets(hidden: torch.Tensor, labels: torch.Tensor, num_heads: int):
    """Per head k with anything to predict: (k, the hidden states h_t of trained positions, their labels t+k+2)."""
    for k in range(num_heads):
        shift = k + 2
        if labels.shape[1] <= shift:
            return
        target = labels[:, shift:]
        keep = target != IGNORE
        yield k, hidden[:, :-shift][keep], target[keep]


# ---------------------------------------------------------------- self-distillation


def prompt_key(example: Example) -> tuple[int, ...]:
    """The example's prompt: its tokens before the first trained one."""
    first = next((i for i, label in enumerate(example.labels) if label != IGNORE), len(example.labels))
    return tuple(example.input_ids[:first])


DISTILL_BATCH = 16  # prompts generated at once (left-padded), by length


def _greedy_answers(
    model: MedusaModel, prompts: list[tuple[int, ...]], limit: int, pad_id: int | None
) -> dict[tuple[int, ...], list[int]]:
    """{prompt: the base's greedy answer}, up to its EOS and `limit` tokens in all, in left-padded batches."""
    hf = model.hf
    device = next(hf.parameters()).device
    eos = hf.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) - {None}
    pad = pad_id if pad_id is not None else 0
    was_training = hf.training
    hf.eval()
    out: dict[tuple[int, ...], list[int]] = {}
    order = sorted(prompts, key=len)
    scope = model.base.disable_adapter() if model.has_lora else contextlib.nullcontext()
    with scope, torch.no_grad():
        for start in range(0, len(order), DISTILL_BATCH):
            batch = order[start : start + DISTILL_BATCH]
            width = max(len(p) for p in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, prompt in enumerate(batch):
                ids[row, width - len(prompt) :] = torch.tensor(prompt)
                mask[row, width - len(prompt) :] = 1
            generated = hf.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max(limit - width, 1),
                do_sample=False,
                pad_token_id=pad,
            )
            for row, prompt in enumerate(batch):
                answer = generated[row, width:].tolist()
                end = next((i + 1 for i, tok in enumerate(answer) if tok in eos), len(answer))
                out[prompt] = answer[:end]
    hf.train(was_training)
    return out


def self_distilled(model: MedusaModel, run: RunInfo) -> dict[tuple[int, ...], Example]:
    """{prompt: the example with the base's own greedy answer}, for every training example; generated
    once and cached in the run directory (MEDUSA_DISTILL), read back on a resume."""
    cache = run.run_dir / MEDUSA_DISTILL if run.run_dir is not None else None
    answers: dict[tuple[int, ...], list[int]] = {}
    if cache is not None and cache.is_file():
        for line in cache.read_text().splitlines():
            row = json.loads(line)
            answers[tuple(row["prompt"])] = row["answer"]
    prompts = list(dict.fromkeys(prompt_key(ex) for ex in run.examples))
    todo = [p for p in prompts if p not in answers]
    if todo:
        print(f"medusa: self-distillation: generating the base's answers to {len(todo)} prompts", file=messages())
        answers |= _greedy_answers(model, todo, run.max_length or 512, run.pad_id)
        if cache is not None:
            cache.write_text("".join(json.dumps({"prompt": list(p), "answer": answers[p]}) + "\n" for p in prompts))
    out: dict[tuple[int, ...], Example] = {}
    for ex in run.examples:
        prompt = prompt_key(ex)
        answer = answers[prompt]
        if not answer:
            raise ModelError(f"{ex.source}: the base model's answer to this prompt is empty; use self_distill: false")
        ids = list(prompt) + answer
        labels = [IGNORE] * len(prompt) + answer
        out[prompt] = Example(ids, labels, ex.source)
    return out
