"""Delta-LoRA (Zi et al. 2023, "Fine-Tuning High-Rank Parameters with the Delta of Low-Rank Matrices").

LoRA, h = W x + s · B A x (s = alpha / r), whose frozen W also takes a share λ of every change
of the adapter once K steps are done (the paper's Algorithm 1, "update ratio" λ, "start steps" K):

    after each optimizer step n > K:   W ← W + λ · s · (B_n A_n − B_{n−1} A_{n−1})

The gradient of A and B is LoRA's: the paper removes LoRA's dropout so that it is the gradient
W itself would get, and W keeps no optimizer state (hence `method.dropout` must be 0).

The sum telescopes. For every step n ≥ K

    W_n = W_0 + λ · s · (B_n A_n − B_K A_K)

so the model after step n computes W_0 x + s · B_n A_n x + λ · s · (B_n A_n − B_K A_K) x. That is how
ftkit runs it: W_0 is never written; a forward hook on each adapted layer adds
λ · s · (sg(B) sg(A) − B_K A_K) x, with sg = stop-gradient (detached live factors: they are B_n, A_n
during step n + 1's forward) and (B_K, A_K) a frozen snapshot taken after step K (at the start when
K = 0, where B_0 = 0 makes it zero). This is the paper's model in exact arithmetic, with the same
gradients, and three things follow from it:
- resume is exact: the checkpoint holds B_n, A_n (the adapter) and the snapshot (method_state), and
  nothing else in the model changed; an in-place W, rebuilt from the same tensors, would differ in
  the rounding of n − K accumulated updates;
- the cost is a second rank-2r product per adapted layer in the forward (no W-sized memory: the
  paper's in-place update needs none either, but cannot be resumed exactly without W itself);
- `final/` is a plain peft LoRA of rank 2r on the untouched base, loadable with
  `PeftModel.from_pretrained` and mergeable:

    ΔW_T = (1 + λ) · s · B_T A_T − λ · s · B_K A_K = s' · B' A',
    A' = [A_T ; A_K]  (2r × in),   B' = [(1 + λ) · B_T , −λ · B_K]  (out × 2r),   s' = 2·alpha / 2r = s.

The total change of W is therefore of rank at most 2r, like PiSSA's converted adapter. How it
differs from LoRA with scale (1 + λ) · s: the forward equals that LoRA's except for the −λ·s·B_K A_K
term, but the gradient of A and B is (1 + λ) times smaller; Adam normalises the gradient's scale
away (up to eps, weight decay and clipping), so the two differ mainly by the −λ·s·B_K A_K term and
by the dynamics before step K (plain LoRA with scale s).

Step counting is ftkit's: `start_step: K` means W follows the adapter from optimizer step K on
(K = 0: from the first step): its first update is after step K + 1. The paper's loop runs t = 0, 1, ...
and updates W after iteration t when t > K_paper, i.e. first after optimizer step K_paper + 2; so
`start_step` = K_paper + 1 (with the paper's K_paper = 500 the difference is one step).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft.tuners.lora import LoraLayer

from ftkit.errors import ModelError
from ftkit.methods import lora
from ftkit.methods.base import MethodHooks, RunInfo
from ftkit.models import hf_files
from ftkit.recipe.methods import DeltaLoraConfig

ADAPTER = "default"


def run_problems(config: DeltaLoraConfig, skeleton: Any, run: RunInfo) -> list[str]:
    """LoRA's checks, and a start step the run reaches."""
    return lora.run_problems(config, skeleton, run) + _start_problems(config, run)


def _start_problems(config: DeltaLoraConfig, run: RunInfo) -> list[str]:
    if run.total_steps is not None and config.start_step >= run.total_steps:
        return [
            f"method.start_step: {config.start_step} is not below the run's {run.total_steps} steps, so W would "
            "never follow the adapter; lower it (or use method.name: lora)"
        ]
    return []


def apply(model: Any, config: DeltaLoraConfig, run: RunInfo) -> Any:
    for problem in _start_problems(config, run):
        raise ModelError(problem)
    return lora.apply(model, config, run)


def adapted_layers(model: Any) -> dict[str, Any]:
    """{module name: peft LoRA layer} of every layer with a linear LoRA pair."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
        and ADAPTER in module.lora_A
        and isinstance(module.lora_A[ADAPTER], torch.nn.Linear)
    }


class DeltaTerm:
    """The forward hooks adding λ · s · (sg(B A) − B_K A_K) x to each adapted layer's output, and
    the snapshot (B_K, A_K) they subtract (None until step K)."""

    def __init__(self, model: Any, config: DeltaLoraConfig):
        self.layers = adapted_layers(model)
        self.ratio = config.update_ratio
        self.start_step = config.start_step
        self.snapshot: dict[str, tuple[Any, Any]] | None = None
        if not self.layers:
            raise ModelError("method.target_modules: delta_lora found no linear LoRA layer to follow")
        for name, layer in self.layers.items():
            layer.register_forward_hook(self._hook(name))
        if self.start_step == 0:
            self.take_snapshot()

    def _hook(self, name: str):
        def add_delta(module: Any, args: tuple, output: Any) -> Any:
            if self.snapshot is None or module.disable_adapters or ADAPTER not in module.active_adapters:
                return output
            a_live, b_live = module.lora_A[ADAPTER].weight, module.lora_B[ADAPTER].weight
            a_k, b_k = self.snapshot[name]
            # one rank-2r product: [sg(B), −B_K] [sg(A); A_K] x = (sg(B A) − B_K A_K) x
            a = torch.cat([a_live.detach(), a_k])
            b = torch.cat([b_live.detach(), -b_k], dim=1)
            x = args[0].to(a.dtype)
            delta = (x @ a.T) @ b.T
            return output + (self.ratio * module.scaling[ADAPTER] * delta).to(output.dtype)

        return add_delta

    def take_snapshot(self) -> None:
        self.snapshot = {
            name: (layer.lora_A[ADAPTER].weight.detach().clone(), layer.lora_B[ADAPTER].weight.detach().clone())
            for name, layer in self.layers.items()
        }

    def after_step(self, step: int) -> None:
        if step == self.start_step:
            self.take_snapshot()

    def state(self) -> dict[str, Any]:
        """The snapshot as `{name.lora_A: A_K, name.lora_B: B_K}`; empty before step K."""
        out = {}
        for name, (a_k, b_k) in (self.snapshot or {}).items():
            out[f"{name}.lora_A"], out[f"{name}.lora_B"] = a_k, b_k
        return out

    def load_state(self, tensors: dict[str, Any]) -> None:
        if not tensors:  # the checkpoint is from before step K: no snapshot yet
            self.snapshot = None
            return
        missing = [name for name in self.layers if f"{name}.lora_A" not in tensors]
        if missing:
            raise ModelError(
                f"method_state.safetensors: no Delta-LoRA snapshot for {missing[0]}; is this the same run?"
            )
        device = next(iter(self.layers.values())).lora_A[ADAPTER].weight.device
        self.snapshot = {
            name: (tensors[f"{name}.lora_A"].to(device), tensors[f"{name}.lora_B"].to(device)) for name in self.layers
        }

    def save_final(self, model: Any, out_dir: Path) -> None:
        """final/ as the plain rank-2r LoRA of the module docstring (scale s' = s)."""
        model.save_pretrained(out_dir, safe_serialization=True)
        if self.snapshot is None:  # the run ended before step K: W never moved, the adapter is the model
            return
        weights = hf_files.load_tensors(out_dir)
        for name, (a_k, b_k) in self.snapshot.items():
            key_a, key_b = _saved_key(name, "lora_A"), _saved_key(name, "lora_B")
            a_t, b_t = weights[key_a], weights[key_b]
            weights[key_a] = torch.cat([a_t, a_k.to(a_t)])
            weights[key_b] = torch.cat([(1 + self.ratio) * b_t, -self.ratio * b_k.to(b_t)], dim=1)
        hf_files.save_adapter_weights(out_dir, weights)
        peft_config = hf_files.adapter_config(out_dir)
        peft_config.r *= 2
        peft_config.lora_alpha *= 2  # s' = 2·alpha / 2r = s
        peft_config.save_pretrained(str(out_dir))


def _saved_key(module_name: str, factor: str) -> str:
    """The key peft's save_pretrained gives a factor: the adapter name is dropped."""
    return f"{module_name}.{factor}.weight"


def hooks(model: Any, config: DeltaLoraConfig, run: RunInfo) -> MethodHooks:
    term = DeltaTerm(model, config)
    return MethodHooks(
        after_step=[term.after_step], state=term.state, load_state=term.load_state, save_final=term.save_final
    )
