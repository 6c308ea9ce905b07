"""One table of methods: every row goes through the same end-to-end checks.

Each row: test id → recipe overrides that make the method learn in 20 steps on micro-llama.
LRs are high because the models are tiny. A row with `"base": "pretrained"` trains on the
pretrained micro base and its steering task (tests/pretrained.py) instead of the random-init
base and the extraction task: every method added after the first four runs there, because
prompt methods and (IA)³ cannot move a random-init model (see tests/pretrained.py), and one
task for all of them keeps their losses comparable.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.support.helpers import make_recipe, run_cli

PRETRAINED = "pretrained"
#: stands for the run directories of two finished bottleneck-adapter runs on the pretrained base
#: (the session fixture `bottleneck_adapter_runs`), which an adapter_fusion row fuses
ADAPTER_RUNS = "<bottleneck adapter runs>"


def resolved(case: dict, request) -> dict:
    """`case` with its ADAPTER_RUNS marker replaced by the runs of the `bottleneck_adapter_runs` fixture."""
    method = case.get("method", {})
    if method.get("adapters") != ADAPTER_RUNS:
        return case
    runs = [str(path) for path in request.getfixturevalue("bottleneck_adapter_runs")]
    return {**case, "method": {**method, "adapters": runs}}


#: a Mixtral of two copies of the pretrained base's MLPs (tests/conftest.py moe_base), on the pretrained base's task
MOE = "moe"


@dataclass(frozen=True)
class Run:
    """A table row trained through the CLI: its recipe, run dir, (exit code, stdout, stderr)."""

    name: str
    recipe: Path
    run_dir: Path
    result: tuple[int, str, str]
    pretrained: bool

    @property
    def adapter_base(self) -> str:
        """Where final/'s adapter says its base lives (ftkit points it at the base it trained on)."""
        return json.loads((self.run_dir / "final" / "adapter_config.json").read_text())["base_model_name_or_path"]

    def val_examples(self) -> tuple:
        """(recipe, tokenizer saved in final/, the run's tokenized validation examples)."""
        from transformers import AutoTokenizer

        from ftkit.data import load_splits
        from ftkit.recipe import load_recipe

        recipe = load_recipe(self.recipe)
        tokenizer = AutoTokenizer.from_pretrained(self.run_dir / "final")
        return recipe, tokenizer, load_splits(recipe.data, tokenizer, recipe.train.seed).val

    @property
    def labels(self) -> list[str]:
        """A classifier's class names, in id order (RUN/labels.json)."""
        return json.loads((self.run_dir / "labels.json").read_text())["labels"]


def row_trainer(request, tmp_path_factory, cases: dict[str, dict], data_for: Callable[[bool], Path], **extra):
    """`get(name)`: the row `cases[name]` trained once through `ftkit train` (cached by the caller's
    fixture scope). A `"base": PRETRAINED` row trains on the pretrained micro base; `data_for(pretrained)`
    says which data; `extra` goes into every recipe (e.g. task="classification")."""
    done: dict[str, Run] = {}

    def get(name: str) -> Run:
        if name not in done:
            case = dict(resolved(cases[name], request))
            base = case.pop("base", None)
            pretrained = base in (PRETRAINED, MOE)
            if pretrained:
                case["model"] = {"name": str(request.getfixturevalue("moe_base" if base == MOE else "pretrained_base"))}
            tmp = tmp_path_factory.mktemp(name)
            recipe = make_recipe(tmp, data_for(pretrained), name=name, **extra, **case)
            done[name] = Run(name, recipe, tmp / "runs" / name, run_cli("train", str(recipe)), pretrained)
        return done[name]

    return get


_LORA = {"r": 8, "alpha": 16, "dropout": 0.0}

METHOD_CASES: dict[str, dict] = {
    "full": {"method": {"name": "full"}, "train": {"lr": 3e-3}},
    "freeze": {
        "method": {"name": "freeze", "trainable_layers": 1, "trainable_modules": ["lm_head"]},
        "train": {"lr": 3e-3},
    },
    "lora": {"method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0}, "train": {"lr": 1e-2}},
    "qlora": {
        "method": {"name": "qlora", "r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"lr": 1e-2, "optimizer": "paged_adamw_8bit"},
    },
    # ---- the peft catalogue, on the pretrained base
    "dora": {"base": PRETRAINED, "method": {"name": "dora", **_LORA}, "train": {"lr": 1e-2}},
    "qdora": {"base": PRETRAINED, "method": {"name": "qdora", **_LORA}, "train": {"lr": 1e-2}},
    "rslora": {"base": PRETRAINED, "method": {"name": "rslora", **_LORA, "alpha": 8}, "train": {"lr": 1e-2}},
    "lora_pissa": {
        "base": PRETRAINED,
        "method": {"name": "lora", **_LORA, "alpha": 8, "init": "pissa"},
        "train": {"lr": 3e-3},
    },
    "lora_olora": {
        "base": PRETRAINED,
        "method": {"name": "lora", **_LORA, "alpha": 8, "init": "olora"},
        "train": {"lr": 3e-3},
    },
    # save_every: a checkpoint mid-run holds these methods' own optimizer state (groups, LoRA-FA's)
    "lora_plus": {
        "base": PRETRAINED,
        "method": {"name": "lora_plus", **_LORA, "lr_ratio": 4},
        "train": {"lr": 3e-3, "save_every": 10},
    },
    "lora_fa": {"base": PRETRAINED, "method": {"name": "lora_fa", **_LORA}, "train": {"lr": 1e-2, "save_every": 10}},
    # start_step 3: plain LoRA for 3 steps, then W follows (the DPO cross-table runs 4 steps); the
    # checkpoint at 10 holds the snapshot B_3 A_3
    "delta_lora": {
        "base": PRETRAINED,
        "method": {"name": "delta_lora", **_LORA, "update_ratio": 0.5, "start_step": 3},
        "train": {"lr": 1e-2, "save_every": 10},
    },
    # micro-llama has 2 layers: threshold 0.5 keeps the more important one (the sharing itself is
    # tested on a 4-layer base in tests/unit/test_lora_drop.py)
    "lora_drop": {
        "base": PRETRAINED,
        "method": {"name": "lora_drop", **_LORA, "sample_fraction": 0.25, "sample_steps": 5, "threshold": 0.5},
        "train": {"lr": 1e-2},
    },
    # random-init base: position interpolation (rope_scaling_factor) moves a pretrained micro base's first loss
    # above ln(vocab); here G = 0.25 × max_length 128 = 32 on rows of 60-90 tokens, so S²-Attn is on, and the
    # reload check (full attention on base/ + final/) also proves evaluation ran with full attention and the
    # interpolated RoPE
    "longlora": {
        "method": {"name": "longlora", **_LORA, "rope_scaling_factor": 2.0},
        "train": {"lr": 2e-2},
    },
    "vera": {"base": PRETRAINED, "method": {"name": "vera", "r": 64}, "train": {"lr": 3e-2}},
    "adalora": {
        "base": PRETRAINED,
        "method": {"name": "adalora", "init_r": 8, "target_r": 4, "alpha": 16, "tinit": 2, "tfinal": 4},
        "train": {"lr": 1e-2},
    },
    "ia3": {"base": PRETRAINED, "method": {"name": "ia3"}, "train": {"lr": 3e-2}},
    "loha": {"base": PRETRAINED, "method": {"name": "loha", "r": 4, "alpha": 8}, "train": {"lr": 1e-2}},
    "lokr": {"base": PRETRAINED, "method": {"name": "lokr", "r": 8, "alpha": 16}, "train": {"lr": 1e-2}},
    "prompt_tuning": {
        "base": PRETRAINED,
        "method": {"name": "prompt_tuning", "num_virtual_tokens": 8, "init": "text", "init_text": "List the words."},
        "train": {"lr": 1e-1},
    },
    "prefix_tuning": {
        "base": PRETRAINED,
        "method": {"name": "prefix_tuning", "num_virtual_tokens": 8},
        "train": {"lr": 1e-1},
    },
    "p_tuning": {"base": PRETRAINED, "method": {"name": "p_tuning", "num_virtual_tokens": 8}, "train": {"lr": 1e-2}},
    "p_tuning_lstm": {
        "base": PRETRAINED,
        "method": {"name": "p_tuning", "num_virtual_tokens": 8, "encoder": "lstm", "encoder_hidden_size": 32},
        "train": {"lr": 1e-2},
    },
    "peft_fourierft": {
        "base": PRETRAINED,
        "method": {"name": "peft", "type": "fourierft", "n_frequency": 500, "scaling": 300.0, "init_weights": True},
        "train": {"lr": 1e-2},
    },
    # ---- ftkit's own bottleneck adapters (tests/unit/test_bottleneck.py checks step 0 = the base)
    "adapter_houlsby": {
        "base": PRETRAINED,
        "method": {"name": "adapter", "config": "houlsby", "reduction_factor": 4},
        "train": {"lr": 1e-2, "save_every": 10},
    },
    "adapter_pfeiffer": {
        "base": PRETRAINED,
        "method": {"name": "adapter", "config": "pfeiffer", "reduction_factor": 2, "non_linearity": "gelu"},
        "train": {"lr": 1e-2},
    },
    # fuses a houlsby and a pfeiffer run of 10 steps each (conftest.py: bottleneck_adapter_runs)
    "adapter_fusion": {
        "base": PRETRAINED,
        "method": {"name": "adapter_fusion", "adapters": ADAPTER_RUNS},
        "train": {"lr": 1e-2, "save_every": 10},
    },
    "llama_adapter": {
        "base": PRETRAINED,
        "method": {"name": "llama_adapter", "adapter_len": 8, "adapter_layers": 2},
        "train": {"lr": 3e-2},
    },
    # routers + LoRA on the experts of a MoE of the pretrained base (routers alone cannot move a mixture
    # of identical experts: every routing gives the same output); the load-balancing loss is reg_loss
    "moe_router": {
        "base": MOE,
        "method": {"name": "moe_router", "aux_loss_coef": 0.01, "lora_experts": {"r": 8, "alpha": 16}},
        "train": {"lr": 1e-2},
    },
    # Medusa-2: two heads with their own projections on a LoRA base; the loss is the LM's plus the heads'
    # (tests/integration/test_medusa_cli.py has the frozen base, decoding, eval and merge)
    "medusa": {"method": {"name": "medusa", "heads": 2, "base": "lora", **_LORA}, "train": {"lr": 1e-2}},
}

# ---- task: classification (tests/classification_data.py: round vs angular shapes), every family once.
# Each row trains a new `score` head besides its method; 20 steps of batch 8 on micro-llama. The
# random-init base serves every family here but the prompt methods, which learn only on the pretrained
# one. Prompt tuning learns the head's task slowly through 8 virtual tokens: 40 steps (measured last-5 /
# first-5 loss 0.82 on the pretrained base with transformers 5.25 / torch 2.13; 20 steps gave 0.91).
CLASSIFICATION_CASES: dict[str, dict] = {
    "full": {"method": {"name": "full"}, "train": {"lr": 3e-3}},
    "freeze": {"method": {"name": "freeze", "trainable_layers": 1}, "train": {"lr": 3e-3}},
    "lora": {"method": {"name": "lora", **_LORA}, "train": {"lr": 1e-2}},
    "dora": {"method": {"name": "dora", **_LORA}, "train": {"lr": 1e-2}},
    "vera": {"method": {"name": "vera", "r": 64}, "train": {"lr": 3e-2}},
    "adalora": {
        "method": {"name": "adalora", "init_r": 8, "target_r": 4, "alpha": 16, "tinit": 2, "tfinal": 4},
        "train": {"lr": 1e-2},
    },
    "ia3": {"method": {"name": "ia3"}, "train": {"lr": 3e-2}},
    "loha": {"method": {"name": "loha", "r": 4, "alpha": 8}, "train": {"lr": 1e-2}},
    "lokr": {"method": {"name": "lokr", "r": 8, "alpha": 16}, "train": {"lr": 1e-2}},
    # LoRA-drop's scoring run goes through the classifier's head (its rows carry a class id, no token labels)
    "lora_drop": {
        "method": {"name": "lora_drop", **_LORA, "sample_fraction": 0.25, "sample_steps": 5, "threshold": 0.5},
        "train": {"lr": 1e-2},
    },
    "prompt_tuning": {
        "base": PRETRAINED,
        "method": {"name": "prompt_tuning", "num_virtual_tokens": 8},
        "train": {"lr": 1e-2, "max_steps": 40},
    },
}
