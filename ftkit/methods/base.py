"""What every method family provides: a typed recipe section and `apply`.

A method module defines a pydantic config class (its `method:` recipe section,
discriminated by `name`) and a function `apply(model, config) -> model` that
marks what trains. Methods know nothing about the loop; the loop knows nothing
about methods.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict


class MethodConfig(BaseModel):
    """Base of every `method:` section. Subclasses set `name: Literal[...]`."""

    model_config = ConfigDict(extra="forbid")

    #: learning rate used when `train.lr` is not given (Anyscale Llama-2 study:
    #: 1e-5 for full fine-tuning, 1e-4 for LoRA-family adapters)
    default_lr: ClassVar[float] = 1e-4
    #: one-line description shown by `ftkit methods`
    summary: ClassVar[str] = ""
    #: True when the result is a PEFT adapter (saved as adapter_config.json + weights)
    is_adapter: ClassVar[bool] = True
    #: True when the method needs the base model quantized to 4 bits
    needs_4bit: ClassVar[bool] = False
    #: True when the method trains quantized weights directly (impossible)
    trains_base_weights: ClassVar[bool] = False
