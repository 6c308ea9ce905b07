"""The run directory's layout: every name ftkit writes in a run, and how to find its parts.

This module owns the run-directory contract (DESIGN.md); no other module spells these
names. It sits in the bottom layer beside `errors` and `io` because everything reads
runs: training writes them, eval / generate / merge / report read them.

    RUN/recipe.yaml                  the resolved recipe, exactly what ran
    RUN/metrics.jsonl                one JSON object per logged step and per eval
    RUN/checkpoints/step-N/          resumable; complete.json written last (train.checkpoint)
    RUN/final/                       adapter (PEFT format) or full model, + tokenizer
    RUN/base/                        the base a run trained on when ftkit made it (built-in, merged adapter)
    RUN/summary.json  loss.png  report.md  samples.jsonl
    RUN/labels.json                  a classifier's class names (task: classification)
    RUN/reference_logps.safetensors  precomputed reference log-probs (dpo / ipo)
    RUN/lora_drop.json               the layers LoRA-drop kept
    RUN/eval-*.json                  `ftkit eval` results, newest last
    RUN/logs/libraries.log           what the libraries printed and warned (stderr keeps ftkit's lines)
    RUN/logs/<tracker>/              train.report_to: tensorboard event files, MLflow store, W&B offline run
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ftkit.errors import RunDirError

RECIPE = "recipe.yaml"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
FINAL = "final"
BASE = "base"
SUMMARY = "summary.json"
PLOT = "loss.png"
REPORT = "report.md"
SAMPLES = "samples.jsonl"
REFERENCE_LOGPS = "reference_logps.safetensors"
LABELS = "labels.json"
LORA_DROP = "lora_drop.json"
#: inside final/ of a bottleneck-adapter or AdapterFusion run (ftkit.models.bottleneck)
BOTTLENECK_WEIGHTS = "bottleneck_model.safetensors"
BOTTLENECK_CONFIG = "bottleneck_config.json"
ROUTING = "routing.json"  # moe_router: which expert each val domain routes to
MEDUSA_DISTILL = "medusa_self_distill.jsonl"  # method medusa, self_distill: the base's own answers
# inside final/ and checkpoints of a medusa run (FasterDecoding/Medusa's names)
MEDUSA_HEADS = "medusa_lm_head.safetensors"
MEDUSA_CONFIG = "config.json"
MEDUSA_MERGED_DIR = "medusa"  # beside a merged model: the heads
EVAL_GLOB = "eval-*.json"
LOGS = "logs"
LIBRARIES_LOG = f"{LOGS}/libraries.log"

#: entries `ftkit train` writes in a run directory (and may therefore replace with --overwrite)
RUN_ENTRIES = (
    RECIPE,
    METRICS,
    CHECKPOINTS,
    FINAL,
    BASE,
    SUMMARY,
    PLOT,
    REPORT,
    SAMPLES,
    REFERENCE_LOGPS,
    LABELS,
    LORA_DROP,
    ROUTING,
    MEDUSA_DISTILL,
    LOGS,
)
#: outputs of the end of a run, stale once a resume starts from an earlier step
END_ENTRIES = (FINAL, SAMPLES)

# inside checkpoints/step-N/
COMPLETE = "complete.json"
TRAINER_STATE = "trainer_state.json"
STEP_DIR = re.compile(r"^step-(\d+)$")


def is_run_dir(path: Path) -> bool:
    """True for a directory `ftkit train` made (it holds recipe.yaml)."""
    return path.is_dir() and (path / RECIPE).is_file()


def is_eval_file(name: str) -> bool:
    return name.startswith("eval")


def ensure_inside(run_dir: Path, path: Path) -> None:
    """RunDirError unless `path` resolves inside `run_dir` (symlinks followed): ftkit writes only there."""
    if not path.resolve().is_relative_to(run_dir.resolve()):
        raise RunDirError(
            f"{path} resolves to {path.resolve()}, outside the run directory {run_dir}; "
            "ftkit writes only inside its run directory: remove the link or choose another --output-dir"
        )


def checkpoints_dir(run_dir: Path) -> Path:
    """`run_dir/checkpoints`, refused when it resolves outside the run dir (a symlink elsewhere)."""
    root = run_dir / CHECKPOINTS
    ensure_inside(run_dir, root)
    return root


def is_complete(path: Path) -> bool:
    """True for ftkit's own finished checkpoint: `step-N`, not a symlink, complete.json written."""
    return STEP_DIR.match(path.name) is not None and (path / COMPLETE).is_file() and not path.is_symlink()


def step_of(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """ftkit's complete checkpoints in the run, oldest first."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=step_of)


def read_labels(run_dir: Path) -> list[str] | None:
    """The class names a classification run recorded (RUN/labels.json), or None when it has none."""
    path = Path(run_dir) / LABELS
    return list(json.loads(path.read_text())["labels"]) if path.is_file() else None


def has_completed(run_dir: Path) -> bool:
    """True when the run wrote final/ and its summary says it completed."""
    summary = run_dir / SUMMARY
    if not (run_dir / FINAL).is_dir() or not summary.is_file():
        return False
    try:
        return json.loads(summary.read_text()).get("facts", {}).get("status") == "completed"
    except (OSError, ValueError, AttributeError):
        return False
