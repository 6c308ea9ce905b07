"""The method registry: `method.name` in a recipe → a config class and an `apply` function.

Adding a method touches its own module, one `register(...)` line below and one row
in the shared test table (tests/methods_table.py); nothing in the loop, the CLI or
the checkpoint code. Importing this package must stay light (no torch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from typing import Any

from ftkit.methods.base import MethodConfig


@dataclass(frozen=True)
class MethodEntry:
    name: str
    config: type[MethodConfig]
    module: str  # module holding `apply(model, config) -> model`

    def apply(self, model: Any, config: MethodConfig) -> Any:
        fn: Callable[[Any, MethodConfig], Any] = import_module(self.module).apply
        return fn(model, config)


REGISTRY: dict[str, MethodEntry] = {}


def register(config: type[MethodConfig], module: str) -> None:
    name = config.model_fields["name"].default
    REGISTRY[name] = MethodEntry(name, config, module)


def method_configs() -> list[type[MethodConfig]]:
    return [entry.config for entry in REGISTRY.values()]


def get_method(name: str) -> MethodEntry:
    return REGISTRY[name]


from ftkit.methods import configs as _c  # noqa: E402

register(_c.FullConfig, "ftkit.methods.full")
register(_c.FreezeConfig, "ftkit.methods.freeze")
register(_c.LoraConfig, "ftkit.methods.lora")
register(_c.QloraConfig, "ftkit.methods.lora")
