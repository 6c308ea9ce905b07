"""The LoRA family through peft's `LoraConfig`: lora, qlora, dora, qdora, rslora (+ lora_plus, lora_fa).

LoRA (Hu et al. 2021): h = W x + s · B A x, with W frozen, A ∈ R^{r×in}, B ∈ R^{out×r}.
    lora / qlora   s = alpha / r; QLoRA (Dettmers et al. 2023) is the same adapter on a 4-bit
                   NF4 base, only frozen (see ftkit.methods.adapters.wrap for why not
                   peft's `prepare_model_for_kbit_training`).
    rslora         s = alpha / √r (Kalajdzievski 2023): the update's scale no longer shrinks
                   as r grows, so high ranks keep learning.
    dora / qdora   h = m ⊙ (W + s·BA) x / ‖W + s·BA‖_c (Liu et al. 2024): LoRA moves the
                   direction of each output row, a trained vector m its magnitude.

`init` picks how A and B start (peft's `init_lora_weights`):
    kaiming   A Kaiming-uniform, B = 0: training starts exactly at the base model.
    gaussian  A ~ N(0, 1/r), B = 0.
    pissa     W = U S Vᵀ; B A = U_r S_r V_rᵀ (top-r singular part), the base keeps W − B A
              (Meng et al. 2024): the adapter starts on the directions that matter most.
    olora     B A from a QR decomposition of W, the base keeps the rest (Büyükakyüz 2024).
    loftq     with a 4-bit base Q(W): B A = the best rank-r fit of W − Q(W) (Li et al. 2023),
              so base + adapter starts closer to the 16-bit W than Q(W) alone.

PiSSA and OLoRA change the base weights, so `final/` is converted to an ordinary LoRA
of rank 2r on the original base (peft's `path_initial_model_for_weight_conversion`):
ΔW = B A − B₀ A₀ = [B | −B₀] [A ; A₀]. Checkpoints keep the unconverted adapter.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

import peft
import torch
from peft import replace_lora_weights_loftq

from ftkit.errors import ModelError
from ftkit.methods.adapters import check_target_modules, target_problems, task_type, wrap
from ftkit.methods.base import MethodHooks, RunInfo
from ftkit.recipe.methods import LoraConfig

#: `init` → peft's `init_lora_weights` (True is peft's Kaiming-uniform A, zero B)
_PEFT_INIT: dict[str, Any] = {"kaiming": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}
#: inits that move part of W into the adapter (the base weights change)
MUTATING_INITS = ("pissa", "olora")


def peft_config(config: LoraConfig, model: Any, **extra: Any) -> Any:
    """The peft `LoraConfig` for a LoRA-family recipe section; `extra`: more peft.LoraConfig arguments."""
    init = _PEFT_INIT.get(config.init, True)  # loftq starts from the default and is set after
    if config.init == "pissa" and config.init_svd_iters:
        init = f"pissa_niter_{config.init_svd_iters}"
    return peft.LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        bias=config.bias,
        target_modules=config.target_modules,
        modules_to_save=config.modules_to_save,
        init_lora_weights=init,
        task_type=task_type(model),
        **config.peft_flags,
        **extra,
    )


def apply(model: Any, config: LoraConfig, run: RunInfo, **peft_extra: Any) -> Any:
    check_target_modules(model, config.target_modules)
    if config.init == "loftq":
        _check_loftq_device()
    model = wrap(model, peft_config(config, model, **peft_extra), config.name)
    if config.init == "loftq":
        _init_loftq(model)
    return model


def run_problems(config: LoraConfig, skeleton: Any, run: RunInfo) -> list[str]:
    """Targets that are not linear layers of the model; loftq without a CUDA GPU."""
    problems = target_problems(skeleton, config)
    if config.init == "loftq" and not torch.cuda.is_available():
        problems.append(LOFTQ_DEVICE)
    return problems


def hooks(model: Any, config: LoraConfig, run: RunInfo) -> MethodHooks:
    if config.init in MUTATING_INITS:
        return MethodHooks(save_final=_saver_as_plain_lora(model))
    return MethodHooks()


def _saver_as_plain_lora(model: Any):
    """Save the adapter as it starts (peft's documented PiSSA/OLoRA recipe), and return a
    `save_final` that writes the trained one as a plain LoRA relative to the original base."""
    initial = Path(tempfile.mkdtemp(prefix="ftkit-initial-adapter-"))
    atexit.register(shutil.rmtree, initial, True)  # also gone if the run dies before save_final
    config = model.peft_config["default"]
    mutating_init = config.init_lora_weights
    # peft reloads this adapter to subtract it; marked True, loading it must not decompose W again
    config.init_lora_weights = True
    try:
        model.save_pretrained(initial, safe_serialization=True)
    finally:
        config.init_lora_weights = mutating_init

    def save_final(trained: Any, out_dir: Path) -> None:
        trained.save_pretrained(out_dir, safe_serialization=True, path_initial_model_for_weight_conversion=str(initial))
        # the conversion loaded the initial adapter into the model; drop it again
        if initial.name in trained.peft_config:
            trained.delete_adapter(initial.name)
        shutil.rmtree(initial, ignore_errors=True)

    return save_final


LOFTQ_DEVICE = (
    "method.init: loftq runs on a CUDA GPU only (peft computes it there: peft/utils/loftq_utils.py); "
    "use init kaiming on this machine"
)


def _check_loftq_device() -> None:
    if not torch.cuda.is_available():
        raise ModelError(LOFTQ_DEVICE)


def _init_loftq(model: Any) -> None:
    """Set every LoRA pair to the rank-r SVD fit of W − Q(W), W read from the base's safetensors."""
    source = model.get_base_model().name_or_path
    local = Path(source)
    try:
        replace_lora_weights_loftq(model, model_path=str(local) if local.is_dir() else None)
    except (ValueError, FileNotFoundError) as err:
        raise ModelError(
            f"method.init: loftq needs the 16-bit weights of {source} as safetensors on disk: {err}"
        ) from err
