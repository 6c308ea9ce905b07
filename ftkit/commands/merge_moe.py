"""`ftkit merge --config moe.yaml --out DIR` with `method: moe`: fine-tuned models become one sparse
mixture-of-experts model (the mergekit-moe / mergoo idea) that plain transformers loads.

    method: moe
    base: runs/extract/base          # attention, norms, embeddings (and the head) come from here
    experts:
      - {model: runs/extract, prompts: ["Extract the meaning representation ..."]}
      - {model: runs/describe, prompts: ["Describe in one sentence ..."]}
    gate: hidden                     # hidden | random | uniform: how the routers start
    experts_per_token: 2             # experts each token goes through (top-k)
    dtype: float32
    seed: 0                          # gate: random

An expert is a run directory (its final/: a full fine-tune, or an adapter merged into its base
in memory), a model directory, or an adapter directory. Every expert and the base must share one
Llama/Mistral layout without MLP or attention biases (model_type llama or mistral; tensor names
and shapes equal, the vocabulary included); the output is a `MixtralForCausalLM` written as the
hub's Mixtral checkpoints are (`block_sparse_moe.experts.E.w1/w2/w3`, `block_sparse_moe.gate`),
which transformers 5.x fuses on load into `mlp.experts.gate_up_proj` / `down_proj` and
`mlp.gate`. Per layer, expert E's MLP is its gate_proj → w1, up_proj → w3, down_proj → w2;
everything else is the base's. Only the MLPs of the experts are kept, so experts should be tuned
with MLP-only LoRA (`target_modules: [gate_proj, up_proj, down_proj]`): what they changed in
attention is lost.

Router initialisation, per layer a (experts × hidden) matrix:
    hidden   mergekit-moe's hidden-state routers (mergekit/moe/router.py get_gate_params, its
             "hidden_avg" mode; its plain "hidden" takes each prompt's last token instead): each
             expert's prompts go through the base; the hidden state entering each layer, averaged
             over the prompt's tokens and over the prompts, normalised to unit length, is the
             expert's row. A token whose hidden state looks like an expert's prompts routes to it.
             Hidden states of a pretrained model share large common directions, so rows of
             different experts can be nearly parallel (routing close to even): the merge report
             gives the largest cosine between two experts' rows (`gate_max_cosine`), as mergekit
             warns of "degenerate" gates.
    random   N(0, 1) rows, normalised to unit length (seeded by `seed`).
    uniform  zeros: every expert gets the same probability; top-k then picks the first experts.

Verification (nothing is written unless it passes): the written model is loaded back with
`AutoModelForCausalLM`, in float32. With every expert slot set to the base's MLP its logits must
equal the dense base's, and for each expert E, with every slot set to slot E as written, they must
equal the dense base carrying E's MLP: whatever the routers pick, a mixture of identical experts
whose top-k weights sum to 1 is that expert. Logits are compared as `ftkit merge` compares them
(`logit_agreement`: centred, relative to the largest centred reference logit) on random token
sequences; the bound is MOE_TOLERANCE.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig

from ftkit.commands.merge import REPORT_FILE, logit_agreement
from ftkit.errors import FtkitError, ModelError, VerificationError
from ftkit.io import check_out, publish
from ftkit.models import hf_files
from ftkit.models.builtin import is_builtin, is_packaged
from ftkit.models.gguf import local_model
from ftkit.models.hf_files import Weights, check_same_architecture
from ftkit.models.target import load_model, load_tokenizer, resolve_target
from ftkit.recipe.schema import ModelSection
from ftkit.recipe.yaml_loader import dump_yaml

#: max |Δ logit| MoE-of-identical-experts vs the dense model, relative to the logits' scale
#: (`logit_agreement`'s rel_logit_diff), float32. Issue 17 asks for ≤ 1e-4 fp32; the relative
#: form makes that mean the same for a 2-layer toy (logits ~1) and SmolLM2 (logits ~20). The MoE
#: computes each expert once per selected slot and sums w·f(x) with Σw = 1, so the only difference
#: from the dense MLP is one rounding of that weighted sum per layer: measured ~1e-7 (toys) to
#: ~1e-6 (SmolLM2-135M, 30 layers), far under the bound; a swapped w1/w3 gives ~1e-1.
MOE_TOLERANCE = 1e-4
MOE_LAYOUTS = ("llama", "mistral")
CONFIG_FILE = "merge_config.yaml"
PROBE_SHAPE = (2, 32)
#: per layer, the dense MLP's tensors and the Mixtral expert tensor each becomes
EXPERT_TENSORS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MoeExpert(_Section):
    """One expert: a fine-tuned model and prompts that describe what it is good at."""

    model: str = Field(..., description="Run directory, model directory, or adapter (merged into its base).")
    prompts: list[str] = Field(default_factory=list, description="gate: hidden: prompts this expert should get.")


class MoeConfig(_Section):
    """Fine-tuned models that share one base become a Mixtral mixture of experts."""

    method: Literal["moe"] = Field(..., description="moe: build a mixture of experts.")
    base: str = Field(..., description="Model (or full fine-tune run) giving attention, norms and embeddings.")
    experts: list[MoeExpert] = Field(..., description="The experts, each contributing its MLPs.")
    gate: Literal["hidden", "random", "uniform"] = Field("hidden", description="Router initialisation.")
    experts_per_token: int = Field(2, ge=1, description="Experts each token is routed to (top-k).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Dtype of the merged weights.")
    seed: int = Field(0, description="gate: random: seed of the router rows.")
    router_aux_loss_coef: float = Field(
        0.02, ge=0.0, description="Written to config.json: weight of the load-balancing loss when training."
    )
    max_shard_size: int = Field(2 * 1024**3, ge=1, description="Largest output shard in bytes.")


def moe_rule_problems(config: MoeConfig) -> list[tuple[tuple, str]]:
    """Every rule between keys that the config breaks, as (key path, message)."""
    problems = []
    n = len(config.experts)
    if n < 2:
        problems.append((("experts",), f"a mixture needs at least 2 experts; got {n}"))
    if n < config.experts_per_token:
        problems.append(
            (
                ("experts_per_token",),
                f"{config.experts_per_token} experts per token but only {n} experts; "
                "lower experts_per_token or add experts",
            )
        )
    if config.gate == "hidden":
        for i, expert in enumerate(config.experts):
            if not expert.prompts:
                problems.append(
                    (("experts", i, "prompts"), "gate: hidden needs prompts for every expert (or use gate: random)")
                )
    return problems


# ---------------------------------------------------------------- inputs


class StateWeights:
    """A model held in memory (an adapter merged into its base) with the interface of `Weights`."""

    def __init__(self, state: dict[str, torch.Tensor], config: Any, path: str, label: str):
        self._state, self.config, self.path, self.label = state, config, path, label
        self.names = list(state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._state[name].shape)

    def get(self, name: str) -> torch.Tensor:
        return self._state[name]


def base_dir(spec: str) -> Path:
    """The base's weights folder: a model folder, a full fine-tune run's final/, or a packaged built-in."""
    if is_builtin(spec) or is_packaged(spec):
        resolved = local_model(ModelSection(name=spec)).name  # a packaged model: its converted folder
        if is_builtin(spec):
            raise ModelError(
                f"base: {spec} is a random-init built-in, made per run; give the base/ folder of a run on it"
            )
        return Path(resolved)
    try:
        target = resolve_target(spec)
    except FtkitError as err:
        raise ModelError(f"base: {err}") from None
    if target.is_adapter:
        raise ModelError(f"base: {spec} is an adapter; give the model it was trained from (e.g. {target.base})")
    path = Path(target.weights)
    if not path.is_dir() or not hf_files.has_weights(path):
        raise ModelError(f"base: {spec} has no safetensors weights here; give a local model or run directory")
    return path


def open_expert(spec: str, index: int, base: Weights) -> Weights | StateWeights:
    """Expert `index`'s weights: a model folder read lazily, or an adapter merged into its base in memory."""
    key = f"experts[{index}].model"
    try:
        target = resolve_target(spec)
    except FtkitError as err:
        raise ModelError(f"{key}: {err}") from None
    label = f"experts[{index}]"
    if not target.is_adapter:
        path = Path(target.weights)
        if not path.is_dir() or not hf_files.has_weights(path):
            raise ModelError(f"{key}: {spec} has no safetensors weights here; give a local model or run directory")
        return Weights(path, label)
    tokenizer = load_tokenizer(target)
    model = load_model(target, tokenizer, dtype="float32", quantized=False)
    merged = model.merge_and_unload()
    state = {name: t.detach().clone() for name, t in merged.state_dict().items()}
    if "lm_head.weight" in state and "lm_head.weight" not in base.names and merged.config.tie_word_embeddings:
        del state["lm_head.weight"]  # tied to the embedding: not a tensor of its own in the files
    return StateWeights(state, merged.config, target.weights, label)


def check_layout(base: Weights) -> int:
    """The number of layers of a Llama/Mistral-layout base; ModelError naming the layout otherwise."""
    model_type = base.config.model_type
    if model_type not in MOE_LAYOUTS:
        raise ModelError(
            f"base: {base.path} is a {model_type} model; MoE merging supports the Llama/Mistral layout "
            f"(model_type {' or '.join(MOE_LAYOUTS)}) without biases"
        )
    biases = [n for n in base.names if n.endswith(".bias")]
    if biases:
        raise ModelError(
            f"base: {base.path} has biases ({biases[0]}); Mixtral has none, so this layout cannot become a MoE"
        )
    layers = int(base.config.num_hidden_layers)
    for layer in range(layers):
        for proj in EXPERT_TENSORS:
            name = f"model.layers.{layer}.mlp.{proj}.weight"
            if name not in base.names:
                raise ModelError(f"base: {base.path} has no {name}; not the Llama/Mistral layout")
    return layers


# ---------------------------------------------------------------- routers


def gate_rows(config: MoeConfig, base_path: Path, layers: int, hidden: int) -> torch.Tensor:
    """Router weights (layers × experts × hidden), float32, as `config.gate` says (module docstring)."""
    n = len(config.experts)
    if config.gate == "uniform":
        return torch.zeros(layers, n, hidden)
    if config.gate == "random":
        rows = torch.randn(layers, n, hidden, generator=torch.Generator().manual_seed(config.seed))
        return rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    rows = torch.stack([prompt_states(model, tokenizer, e.prompts) for e in config.experts], dim=1)
    return rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def gate_max_cosine(gates: torch.Tensor) -> float | None:
    """The largest cosine between two experts' router rows over all layers (None for zero rows)."""
    norms = gates.norm(dim=-1, keepdim=True)
    if bool((norms == 0).any()):
        return None
    unit = gates / norms
    cos = unit @ unit.transpose(1, 2)  # layers × experts × experts
    off_diagonal = ~torch.eye(gates.shape[1], dtype=torch.bool)
    return float(cos[:, off_diagonal].max())


def prompt_states(model: Any, tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    """(layers × hidden): the hidden state entering each layer, mean over each prompt's tokens, then over prompts."""
    per_prompt = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            states = model(input_ids=ids, output_hidden_states=True).hidden_states[:-1]  # input of each layer
            per_prompt.append(torch.stack([s[0].mean(dim=0) for s in states]))
    return torch.stack(per_prompt).mean(dim=0)


# ---------------------------------------------------------------- the merge


def mixtral_config(base: Weights, config: MoeConfig) -> MixtralConfig:
    """A Mixtral config with the base's shapes, attention and rope, and `config`'s experts."""
    cfg = base.config
    keep = {
        key: getattr(cfg, key)
        for key in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
            "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
            "rope_parameters", "attention_dropout", "sliding_window",
        )
        if getattr(cfg, key, None) is not None
    }  # fmt: skip
    return MixtralConfig(
        **keep,
        num_local_experts=len(config.experts),
        num_experts_per_tok=config.experts_per_token,
        router_aux_loss_coef=config.router_aux_loss_coef,
        output_router_logits=False,
        architectures=["MixtralForCausalLM"],
        dtype=config.dtype,
    )


def moe_tensors(
    base: Weights, experts: list[Any], gates: torch.Tensor, layers: int
) -> list[tuple[str, Callable[[], torch.Tensor], torch.Tensor]]:
    """(output name, how to get it, its meta) in layer order: the base's tensors with each MLP replaced
    by the experts' w1/w3/w2 and the layer's router."""
    out: list[tuple[str, Callable[[], torch.Tensor], torch.Tensor]] = []
    mlp = {f"model.layers.{layer}.mlp.{proj}.weight" for layer in range(layers) for proj in EXPERT_TENSORS}
    for name in base.names:
        if name not in mlp:
            out.append((name, lambda name=name: base.get(name), base.meta(name)))
            continue
        if not name.endswith("gate_proj.weight"):
            continue  # each layer's experts are written once, at its gate_proj
        layer = int(name.split(".")[2])
        prefix = f"model.layers.{layer}"
        for e, expert in enumerate(experts):
            for proj, w in EXPERT_TENSORS.items():
                source = f"{prefix}.mlp.{proj}.weight"
                out.append(
                    (
                        f"{prefix}.block_sparse_moe.experts.{e}.{w}.weight",
                        lambda expert=expert, source=source: expert.get(source),
                        base.meta(source),
                    )
                )
        out.append(
            (
                f"{prefix}.block_sparse_moe.gate.weight",
                lambda layer=layer: gates[layer],
                torch.empty(gates.shape[1:], device="meta"),
            )
        )
    return out


def run_moe(config: MoeConfig, out: str | Path, overwrite: bool = False) -> dict:
    """Build, verify and write the MoE into `out` (staged, then renamed); return {"summary": ...}.

    Every input is opened and checked before anything is written (ModelError, exit 2)."""
    out = Path(out)
    check_out(out, overwrite, [("input", e.model) for e in config.experts] + [("base", config.base)])
    started = time.perf_counter()
    base = Weights(base_dir(config.base), "base")
    layers = check_layout(base)
    experts = [open_expert(e.model, i, base) for i, e in enumerate(config.experts)]
    for expert in experts:
        check_same_architecture(base, expert)
    hidden = int(base.config.hidden_size)
    gates = gate_rows(config, base.path, layers, hidden)
    dtype = getattr(torch, config.dtype)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        plan = moe_tensors(base, experts, gates, layers)
        layout = {name: _cast(meta, dtype) for name, _, meta in plan}

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            for name, get, _ in plan:
                yield name, _cast(get(), dtype)

        files = hf_files.save_sharded(layout, staging, config.max_shard_size, tensors=tensors())
        mixtral_config(base, config).save_pretrained(str(staging))
        if (base.path / "generation_config.json").is_file():
            shutil.copy(base.path / "generation_config.json", staging / "generation_config.json")
        if hf_files.has_tokenizer(base.path):
            AutoTokenizer.from_pretrained(base.path).save_pretrained(staging)
        checks = verify_moe(staging, base, experts, dtype)
        (staging / CONFIG_FILE).write_text(dump_yaml(config.model_dump(mode="json")))
        summary = {
            "method": "moe",
            "out": str(out),
            "base": str(base.path),
            "experts": [str(e.path) for e in experts],
            "gate": config.gate,
            "experts_per_token": config.experts_per_token,
            "num_hidden_layers": layers,
            "files": [f.name for f in files],
            "gate_max_cosine": gate_max_cosine(gates),
            "tolerance": MOE_TOLERANCE,
            "checks": checks,
            "wall_s": time.perf_counter() - started,
        }
        (staging / REPORT_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"summary": summary}


def verify_moe(moe_dir: Path, base: Weights, experts: list[Any], dtype: Any) -> list[dict]:
    """The identity checks of the module docstring; VerificationError when one fails, else their figures."""
    moe = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    dense = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32).eval()
    for p in dense.parameters():  # the base as the MoE holds it: rounded to the written dtype
        p.data = p.data.to(dtype).to(torch.float32)
    vocab = int(moe.config.vocab_size)
    probe = torch.randint(0, vocab, PROBE_SHAPE, generator=torch.Generator().manual_seed(0))
    blocks = [layer.mlp.experts for layer in moe.model.layers]
    written = [(b.gate_up_proj.data.clone(), b.down_proj.data.clone()) for b in blocks]
    base_mlps = [mlp_tensors(base, i, dtype) for i in range(len(blocks))]
    checks = []
    try:
        cases = [("base", None, base_mlps)] + [
            (f"experts[{e}]", e, [mlp_tensors(expert, i, dtype) for i in range(len(blocks))])
            for e, expert in enumerate(experts)
        ]
        for label, slot, mlps in cases:
            for block, (gate_up, down), mlp in zip(blocks, written, mlps, strict=True):
                if slot is None:  # every slot ← the base's MLP
                    block.gate_up_proj.data[:] = torch.cat([mlp["gate_proj"], mlp["up_proj"]])
                    block.down_proj.data[:] = mlp["down_proj"]
                else:  # every slot ← slot `slot` as written
                    block.gate_up_proj.data[:] = gate_up[slot]
                    block.down_proj.data[:] = down[slot]
            for layer, mlp in zip(dense.model.layers, mlps, strict=True):
                for proj, tensor in mlp.items():
                    getattr(layer.mlp, proj).weight.data = tensor
            with torch.no_grad():
                agreement = logit_agreement(
                    dense(input_ids=probe).logits.reshape(-1, vocab), moe(input_ids=probe).logits.reshape(-1, vocab)
                )
            checks.append({"experts": label, **agreement})
            if not agreement["rel_logit_diff"] <= MOE_TOLERANCE:
                raise VerificationError(
                    f"MoE with every expert = {label} vs the dense model: max |Δ logit| "
                    f"{agreement['rel_logit_diff']:.3g} of the logits' scale > {MOE_TOLERANCE:g}; nothing written"
                )
    finally:
        for block, (gate_up, down) in zip(blocks, written, strict=True):
            block.gate_up_proj.data, block.down_proj.data = gate_up, down
    return checks


def mlp_tensors(weights: Any, layer: int, dtype: Any) -> dict[str, torch.Tensor]:
    """Layer `layer`'s dense MLP of `weights`, rounded to `dtype`, in float32."""
    return {
        proj: weights.get(f"model.layers.{layer}.mlp.{proj}.weight").to(dtype).to(torch.float32)
        for proj in EXPERT_TENSORS
    }


def _cast(tensor: Any, dtype: Any) -> Any:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor
