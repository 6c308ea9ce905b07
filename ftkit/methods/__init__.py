"""The method registry: `method.name` in a recipe → a config class, `apply`, and optional `hooks`.

Adding a method touches its own module, one `register(...)` line below and one row
in the shared test table (tests/methods_table.py); nothing in the loop, the CLI or
the checkpoint code. A module provides `apply(model, config, run)` and may provide
`hooks(model, config, run) -> MethodHooks`, `model_problems(config, model_config)`,
`run_problems(config, skeleton, run)` and
`model_config_changes(config, model_config)` (see `ftkit.methods.base`).
Importing this package must stay light (no torch, no peft).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any

from ftkit.methods.base import MethodConfig, MethodHooks, RunInfo
from ftkit.recipe import methods as _c


@dataclass(frozen=True)
class MethodEntry:
    name: str
    config: type[MethodConfig]
    module: str  # module holding `apply(model, config, run) -> model` and optionally `hooks`

    def apply(self, model: Any, config: MethodConfig, run: RunInfo | None = None) -> Any:
        return import_module(self.module).apply(model, config, run or RunInfo())

    def model_problems(self, config: MethodConfig, model_config: Any) -> list[str]:
        """What the method needs from the model and this one lacks, from its config alone (before any
        weight is loaded); one `key.path: what to do` line each. Empty when the module has no check."""
        fn = getattr(import_module(self.module), "model_problems", None)
        return list(fn(config, model_config)) if fn is not None else []

    def run_problems(self, config: MethodConfig, skeleton: Any, run: RunInfo) -> list[str]:
        """What the method cannot do in this run, found on the model's skeleton (meta device) and the
        run's facts before any weight loads or the run directory exists; one `key.path: ...` line each."""
        fn = getattr(import_module(self.module), "run_problems", None)
        return list(fn(config, skeleton, run)) if fn is not None else []

    def model_config_changes(self, config: MethodConfig, model_config: Any) -> dict[str, Any]:
        """Attributes of the model's config the method sets before the weights load (e.g. LongLoRA's RoPE
        scaling), as `from_pretrained` keyword arguments. Empty when the module has none."""
        fn = getattr(import_module(self.module), "model_config_changes", None)
        return dict(fn(config, model_config)) if fn is not None else {}

    def hooks(self, model: Any, config: MethodConfig, run: RunInfo | None = None) -> MethodHooks:
        """The method's `MethodHooks` for `model` (already applied); empty when it has none."""
        fn = getattr(import_module(self.module), "hooks", None)
        return fn(model, config, run or RunInfo()) if fn is not None else MethodHooks()


REGISTRY: dict[str, MethodEntry] = {}


def register(config: type[MethodConfig], module: str) -> None:
    name = config.model_fields["name"].default
    REGISTRY[name] = MethodEntry(name, config, module)


def get_method(name: str) -> MethodEntry:
    return REGISTRY[name]


register(_c.FullConfig, "ftkit.methods.full")
register(_c.FreezeConfig, "ftkit.methods.freeze")
register(_c.LoraConfig, "ftkit.methods.lora")
register(_c.QloraConfig, "ftkit.methods.lora")
register(_c.DoraConfig, "ftkit.methods.lora")
register(_c.QdoraConfig, "ftkit.methods.lora")
register(_c.RsloraConfig, "ftkit.methods.lora")
register(_c.LoraPlusConfig, "ftkit.methods.lora_plus")
register(_c.LoraFaConfig, "ftkit.methods.lora_fa")
register(_c.DeltaLoraConfig, "ftkit.methods.delta_lora")
register(_c.LoraDropConfig, "ftkit.methods.lora_drop")
register(_c.LongloraConfig, "ftkit.methods.longlora")
register(_c.VeraConfig, "ftkit.methods.vera")
register(_c.AdaloraConfig, "ftkit.methods.adalora")
register(_c.Ia3Config, "ftkit.methods.ia3")
register(_c.LohaConfig, "ftkit.methods.lycoris")
register(_c.LokrConfig, "ftkit.methods.lycoris")
register(_c.PromptTuningConfig, "ftkit.methods.prompt")
register(_c.PrefixTuningConfig, "ftkit.methods.prompt")
register(_c.PTuningConfig, "ftkit.methods.prompt")
register(_c.GenericPeftConfig, "ftkit.methods.generic")
register(_c.AdapterConfig, "ftkit.methods.bottleneck")
register(_c.AdapterFusionConfig, "ftkit.methods.bottleneck")
register(_c.LlamaAdapterConfig, "ftkit.methods.llama_adapter")
register(_c.MoeRouterConfig, "ftkit.methods.moe_router")
register(_c.MedusaConfig, "ftkit.methods.medusa")
