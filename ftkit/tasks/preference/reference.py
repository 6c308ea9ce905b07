"""Reference models for DPO and IPO: where ρ = log π_ref(y | x) comes from.

    objective.reference   adapter methods (lora, qlora, ...)        full / freeze
    auto                  DisabledAdapter: the same network with    FrozenCopy: a deep copy of the model
                          its adapter switched off; no copy         before training, frozen (2× weights)
    precompute            Precomputed: ρ computed once over train and val before the first step (adapter
                          disabled, or the untrained model), stored in the run dir as
                          reference_logps.safetensors; no reference forward pass during training

Every reference runs in eval mode under no_grad, so ρ is a fixed function of the pair: the three
strategies give the same numbers (up to float summation order), which a test checks.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ftkit.data import PreferencePair, collate
from ftkit.errors import RunDirError
from ftkit.rundir import REFERENCE_LOGPS
from ftkit.tasks.preference.objective import sequence_logps

REFERENCE_FILE = REFERENCE_LOGPS


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """The model in eval mode (no dropout) for the block, then back to the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class DisabledAdapter:
    """ρ from the trained network itself with its PEFT adapter disabled (`PeftModel.disable_adapter()`).

    The base weights are frozen, so this is the model before training, at the cost of one extra
    forward pass per step and no memory for a second copy. `peft_model` is the unwrapped
    PeftModel, the very object that trains.
    """

    kind = "disabled adapter"
    extra_params = 0

    def __init__(self, peft_model: Any):
        self.peft_model = peft_model

    @torch.no_grad()
    def logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.peft_model.disable_adapter(), eval_mode(self.peft_model):
            return sequence_logps(self.peft_model, batch)[0]


class FrozenCopy:
    """ρ from a frozen deep copy of the model taken before training (full and freeze methods)."""

    kind = "frozen copy"

    def __init__(self, model: Any):
        self.model = copy.deepcopy(model).requires_grad_(False).eval()
        self.extra_params = sum(p.numel() for p in self.model.parameters())

    @torch.no_grad()
    def logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return sequence_logps(self.model, batch)[0]


class Precomputed:
    """ρ carried by the batch (`ref_logps`, from pairs whose `ref_logps` were precomputed)."""

    kind = "precomputed"
    extra_params = 0

    def logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "ref_logps" not in batch:
            raise RuntimeError("reference: precompute, but the batch carries no reference log-probs")
        return batch["ref_logps"]


class ModelReference:
    """ρ from a given model as it is (no copy): the untrained model when precomputing before the
    first step, or a base model passed to `evaluate_preferences`."""

    kind = "reference model"
    extra_params = 0

    def __init__(self, model: Any):
        self.model = model

    @torch.no_grad()
    def logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with eval_mode(self.model):
            return sequence_logps(self.model, batch)[0]


def live_reference(model: Any, is_adapter: bool) -> DisabledAdapter | FrozenCopy:
    """The reference `objective.reference: auto` means for this model: see the module docstring."""
    return DisabledAdapter(model) if is_adapter and hasattr(model, "disable_adapter") else FrozenCopy(model)


@torch.no_grad()
def compute_reference_logps(
    reference: Any, pairs: Sequence[PreferencePair], batch_size: int, pad_id: int, device: Any
) -> torch.Tensor:
    """ρ of every pair as a (pairs, 2) float32 tensor [chosen, rejected], in `pairs` order."""
    out = torch.zeros((len(pairs), 2), dtype=torch.float32)
    order = sorted(range(len(pairs)), key=lambda i: pairs[i].length)  # similar lengths: less padding
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = _collate_plain([pairs[i] for i in index], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        ref = reference.logps(batch).float().cpu()
        n = len(index)
        out[index, 0], out[index, 1] = ref[:n], ref[n:]
    return out


def attach(pairs: Sequence[PreferencePair], logps: torch.Tensor) -> None:
    """Store precomputed ρ on the pairs, so the objective's collate puts them in every batch."""
    for pair, (chosen, rejected) in zip(pairs, logps.tolist(), strict=True):
        pair.ref_logps = (chosen, rejected)


def save_reference_logps(run_dir: Path, splits: dict[str, tuple[Sequence[PreferencePair], torch.Tensor]]) -> Path:
    """Write REFERENCE_FILE: per split a (pairs, 2) tensor, and in the metadata a digest of the
    split's pairs (sources and token ids), so a reader can check the file fits its data."""
    path = run_dir / REFERENCE_FILE
    tensors = {split: logps.contiguous() for split, (_, logps) in splits.items()}
    metadata = {f"{split}_digest": pairs_digest(pairs) for split, (pairs, _) in splits.items()}
    save_file(tensors, str(path), metadata=metadata)
    return path


def pairs_digest(pairs: Sequence[PreferencePair]) -> str:
    """sha256 over each pair's source and token ids: changes when the data or tokenizer does."""
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(f"{pair.source}|{pair.chosen.input_ids}|{pair.rejected.input_ids}\n".encode())
    return digest.hexdigest()


def load_reference_logps(run_dir: Path, split: str, pairs: Sequence[PreferencePair]) -> None:
    """Attach the precomputed ρ of `split` from a run dir to `pairs`; RunDirError if they do not match."""
    path = Path(run_dir) / REFERENCE_FILE
    if not path.is_file():
        raise RunDirError(f"{path}: no precomputed reference log-probs in this run")
    with safe_open(str(path), framework="pt") as f:
        digest = (f.metadata() or {}).get(f"{split}_digest")
        if split not in f.keys() or digest != pairs_digest(pairs):  # noqa: SIM118 (safe_open has no `in`)
            raise RunDirError(
                f"{path}: the {split} reference log-probs were computed on other data or another tokenizer; "
                "give the data the run trained on"
            )
        attach(pairs, f.get_tensor(split))


def _collate_plain(pairs: Sequence[PreferencePair], pad_id: int) -> dict[str, torch.Tensor]:
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
