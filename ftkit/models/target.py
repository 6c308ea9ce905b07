"""RUN_OR_MODEL → what to load: the weights, the base they sit on, the tokenizer, and the run's recipe.

Every command that reads a model (eval, generate, merge, extract) accepts the same
argument, resolved here in this order:

1. a run directory (it holds `recipe.yaml`): its `final/`, or `checkpoints/step-N/`
   with `--checkpoint step-N`; the recipe says how the base was loaded (dtype, 4-bit)
   and which data and format the run trained on; a peft adapter there, or ftkit's bottleneck
   adapters (`bottleneck_config.json`: `Target.bottleneck`, attached by `ftkit.models.bottleneck`);
2. an adapter directory (it holds `adapter_config.json`): the base is the one its
   `base_model_name_or_path` names, or `--base`;
3. a model directory (it holds `config.json`);
4. anything else that looks like `org/name` is a hub id (loaded by transformers).

The base of an adapter is checked, not guessed: in a run, the base the adapter
records must be the base the run's recipe trained on; when they differ (a moved or
edited run) the command refuses unless `--base` says which one to use.

Whether a target is a sequence classifier is decided in one place, `Target.is_classifier`:
its run's recipe (`task: classification`), else its adapter's peft task type (SEQ_CLS), else
the model class its config.json names (`*ForSequenceClassification`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from ftkit.errors import ModelError, RunDirError
from ftkit.io import messages
from ftkit.models import bottleneck
from ftkit.models import load as loading
from ftkit.models.builtin import is_builtin
from ftkit.models.gguf import converted_sha256, local_model
from ftkit.models.hf_files import (
    adapter_base,
    adapter_task_type,
    architectures,
    config_labels,
    has_adapter_config,
    has_tokenizer,
    is_adapter_dir,
    is_classifier_architecture,
    is_model_dir,
)
from ftkit.models.load import build_model
from ftkit.recipe import load_recipe
from ftkit.recipe.schema import ModelSection, Recipe
from ftkit.rundir import BASE, CHECKPOINTS, FINAL, RECIPE, complete_checkpoints, is_run_dir, read_labels

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_STEP = re.compile(r"^(?:step-)?(\d+)$")


@dataclass
class Target:
    """A resolved RUN_OR_MODEL.

    `weights` is the adapter or model directory (or hub id) to load; `base` the base an
    adapter sits on, or for a full fine-tune run the model it started from (for
    `--baseline`); `model_cfg` how to load the base (the run's model section, else defaults).
    """

    spec: str
    weights: str
    is_adapter: bool
    base: str | None
    model_cfg: ModelSection
    run_dir: Path | None = None
    recipe: Recipe | None = None
    checkpoint: str | None = None  # "final" or "step-N" for runs
    bottleneck: bool = False  # the adapter is ftkit's bottleneck format (adapter / adapter_fusion), not peft's

    @property
    def tokenizer_source(self) -> str:
        """Where the tokenizer lives: next to the weights when saved there (ftkit saves it), else the base."""
        weights = Path(self.weights)
        if weights.is_dir() and has_tokenizer(weights):
            return str(weights)
        return self.base or self.weights

    @property
    def data_format(self) -> str | None:
        return self.recipe.data.format if self.recipe is not None else None

    @property
    def is_classifier(self) -> bool:
        """A sequence classifier: see the module docstring for how it is told."""
        if self.recipe is not None:
            return self.recipe.task == "classification"
        weights = Path(self.weights)
        if has_adapter_config(weights):
            return adapter_task_type(weights) == "SEQ_CLS"
        return is_model_dir(weights) and is_classifier_architecture(architectures(weights))

    @property
    def task(self) -> str:
        """The recipe's `task` this model was trained for: classification for a classifier, else causal_lm.
        (`ftkit.tasks.task_of(target)` is its Task, preference for a run with a preference objective.)"""
        return "classification" if self.is_classifier else "causal_lm"

    @property
    def labels(self) -> list[str] | None:
        """A classifier's class names in id order: the run's labels.json, else the id2label of the
        model's (or, for an adapter, its base's) config.json; None when unknown or not a classifier."""
        if not self.is_classifier:
            return None
        if self.run_dir is not None:
            found = read_labels(self.run_dir)
            if found is not None:
                return found
        model_dir = Path(self.base if self.is_adapter and self.base else self.weights)
        return config_labels(model_dir) if is_model_dir(model_dir) else None

    def known_labels(self) -> list[str]:
        """`labels`, or ModelError when this classifier's labels are unknown."""
        labels = self.labels
        if labels is None:
            raise ModelError(
                f"{self.spec}: a classifier whose labels are unknown (no labels.json, no id2label in its config); "
                "give its run directory"
            )
        return labels

    def describe(self) -> str:
        what = "adapter" if self.is_adapter else "model"
        where = f"{self.run_dir} ({self.checkpoint})" if self.run_dir is not None else self.weights
        return f"{what} {where}" + (f" on base {self.base}" if self.is_adapter else "")


def resolve_target(spec: str | Path, checkpoint: str | None = None, base: str | None = None) -> Target:
    """Resolve RUN_OR_MODEL (see the module docstring); RunDirError/ModelError with the fix otherwise."""
    spec = str(spec)
    path = Path(spec).expanduser()
    if is_run_dir(path):
        return _resolve_run(path, spec, checkpoint, base)
    if checkpoint is not None:
        raise RunDirError(f"--checkpoint: {spec} is not a run directory (no recipe.yaml), so it has no checkpoints")
    if path.is_dir() and has_adapter_config(path):
        recorded = adapter_base(path)
        chosen = base or recorded
        if chosen is None:
            raise ModelError(f"{path}/adapter_config.json names no base model; pass --base MODEL")
        if base is not None and recorded is not None and not same_model(base, recorded):
            _note(f"note: using --base {base}; the adapter records base {recorded}")
        _check_base_exists(chosen, f"{path}/adapter_config.json")
        return Target(spec, str(path), True, chosen, ModelSection(name=chosen))
    if path.is_dir() and is_model_dir(path):
        return Target(spec, str(path), False, base, ModelSection(name=str(path)))
    if path.exists():
        raise ModelError(
            f"{spec}: not a run directory (recipe.yaml), an adapter (adapter_config.json) or a model (config.json)"
        )
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return Target(spec, spec, False, base, ModelSection(name=spec))
    raise ModelError(f"{spec}: no such run, adapter or model directory, and not a hub id (org/name)")


def _resolve_run(run_dir: Path, spec: str, checkpoint: str | None, base: str | None) -> Target:
    recipe = load_recipe(run_dir / RECIPE)
    weights, label = _run_weights(run_dir, checkpoint)
    trained_base = _trained_base(run_dir, recipe.model)
    model_cfg = recipe.model.model_copy(update={"gradient_checkpointing": False})
    target = Target(spec, str(weights), False, trained_base, model_cfg, run_dir, recipe, label)
    if has_adapter_config(weights):
        target.is_adapter = True
        recorded = adapter_base(weights)
        if base is not None:
            if not same_model(base, trained_base):
                _note(f"note: using --base {base}; the run trained on {trained_base}")
            target.base = base
        elif (
            recorded is not None
            and not same_model(recorded, trained_base)
            and not _moved(run_dir, recorded, trained_base)
        ):
            raise ModelError(
                f"{weights}/adapter_config.json: base_model_name_or_path is {recorded}, but the run's recipe "
                f"trained on {trained_base}; pass --base with the one to use"
            )
    elif bottleneck.is_bottleneck_dir(weights):  # bottleneck adapters sit on the base the run trained on
        target.is_adapter = target.bottleneck = True
        if base is not None:
            if not same_model(base, trained_base):
                _note(f"note: using --base {base}; the run trained on {trained_base}")
            target.base = base
    elif base is not None:
        target.base = base  # the model a full fine-tune is compared against with --baseline
    target.model_cfg = model_cfg.model_copy(update={"name": target.base if target.is_adapter else str(weights)})
    _check_base_exists(target.base, f"{run_dir}/recipe.yaml")
    return target


def _trained_base(run_dir: Path, model: ModelSection) -> str:
    """The model the run trained on: its `base/` when the run wrote one (a built-in model, or an
    adapter such as an SFT run's final/ merged into its base, e.g. DPO after SFT); the converted
    folder of a GGUF file or packaged model (converted again if this machine's cache lacks it);
    else model.name."""
    local = Path(model.name).expanduser()
    if is_builtin(model.name) or (local.is_dir() and is_adapter_dir(local)):
        return str((run_dir / BASE).resolve())
    return local_model(model).name


def _moved(run_dir: Path, recorded: str, trained_base: str) -> bool:
    """True when the base an adapter records is a path that no longer leads to the run's base: the
    run was copied or moved (its own base/ is authoritative), or the converted GGUF lives elsewhere
    on this machine (the file's sha256 names the right one). An adapter whose recorded base is
    another model that exists is not explained by a move, and stays ambiguous."""
    recorded_path = Path(recorded).expanduser()
    if not recorded_path.exists() or recorded_path.name == BASE and (run_dir / BASE).is_dir():
        return True
    sha256 = converted_sha256(recorded_path)
    return sha256 is not None and sha256 == converted_sha256(trained_base)


def _run_weights(run_dir: Path, checkpoint: str | None) -> tuple[Path, str]:
    existing = [p.name for p in complete_checkpoints(run_dir)]
    if checkpoint is None or checkpoint == "final":
        final = run_dir / FINAL
        if not final.is_dir():
            hint = f"; pass --checkpoint with one of: {', '.join(existing)}" if existing else ""
            raise RunDirError(f"{run_dir}: no final/ (the run did not finish){hint}")
        return final, "final"
    match = _STEP.match(checkpoint)
    name = f"step-{int(match.group(1))}" if match else checkpoint
    path = run_dir / CHECKPOINTS / name
    if name not in existing:
        have = ", ".join(existing) if existing else "none"
        raise RunDirError(f"--checkpoint: {run_dir} has no complete checkpoint {name}; complete ones: {have}")
    return path, name


def same_model(a: str, b: str) -> bool:
    """True when two model references name the same thing (local paths compared resolved)."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() or pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b


def _check_base_exists(base: str | None, cited: str) -> None:
    if base is None:
        return
    local = Path(base).expanduser()
    looks_local = base.startswith((".", "/", "~")) or local.exists() or not _HUB_ID.match(base)
    if looks_local and not local.is_dir():
        raise ModelError(f"{cited}: the base model {base} is not here; pass --base with its directory or hub id")


def _note(message: str) -> None:
    print(message, file=messages())


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_tokenizer(target: Target) -> Any:
    """The tokenizer saved with the weights (ftkit saves it in final/ and checkpoints), else the base's,
    loaded as the run's model section says (`ftkit.models.load.load_tokenizer`)."""
    return loading.load_tokenizer(target.model_cfg.model_copy(update={"name": target.tokenizer_source}))


def load_model(
    target: Target, tokenizer: Any, *, dtype: str | None = None, quantized: bool | None = None, base_only: bool = False
) -> Any:
    """The model in eval mode on the device: the base as the run loaded it, plus the adapter.

    `dtype` overrides the recipe's weight dtype; `quantized=False` loads a 4-bit run's
    base in that dtype instead (merging), `True` keeps the recipe's 4-bit setting.
    `base_only` loads the base without the adapter (a full fine-tune's starting point).
    """
    cfg = target.model_cfg
    if base_only:
        if target.base is None:
            raise ModelError(f"{target.spec}: no base model known to compare with; pass --base MODEL")
        cfg = cfg.model_copy(update={"name": target.base})
    updates: dict[str, Any] = {}
    if dtype is not None:
        updates["dtype"] = dtype
    if quantized is False:
        updates["quantization"] = None
    if updates:
        cfg = cfg.model_copy(update=updates)
    labels = target.known_labels() if target.is_classifier else None
    model, _, _ = build_model(cfg, device_type(), seed=0, tokenizer=tokenizer, labels=labels)
    if cfg.quantization is None:
        model = model.to(device_type())
    if target.is_adapter and not base_only:
        model = bottleneck.attach(model, target.weights) if target.bottleneck else attach_adapter(model, target.weights)
    model.eval()
    return model


def adapter_disabled(target: Target, model: Any) -> Any:
    """A context in which `model` (`load_model(target, ...)` of an adapter target) computes as its base."""
    return bottleneck.disabled(model) if target.bottleneck else model.disable_adapter()


def attach_adapter(model: Any, adapter_dir: str) -> Any:
    """`PeftModel.from_pretrained`, with a shape mismatch (wrong base) turned into one clear line."""
    try:
        return PeftModel.from_pretrained(model, adapter_dir)
    except RuntimeError as err:  # torch's size-mismatch report when the adapter was trained on another base
        first = str(err).strip().splitlines()[0]
        raise ModelError(f"{adapter_dir}: the adapter does not fit this base model ({first}); check --base") from err
