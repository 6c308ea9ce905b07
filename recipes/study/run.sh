#!/usr/bin/env bash
# The LoRA-vs-full-vs-QLoRA study (docs/study.md), after Anyscale's "Fine-tuning LLMs: LoRA or
# full-parameter?", on the quickstart task with the packaged SmolLM2-135M-Instruct:
#   1. sweep train.lr (3 values) for full FT, LoRA r8, LoRA r64 and QLoRA r8: the same 32 rows,
#      16 steps of 2, the same 40 val rows (recipes/study/*.yaml, data/study/val.jsonl)
#   2. per method, the run with the lowest best val_loss: `ftkit eval` exact match on those
#      40 val rows (greedy)
#   3. `ftkit compare` over those four best runs: OUT/compare/compare.md (+ .png, .json, .html)
# Usage, from anywhere (paths are the repository's):
#   recipes/study/run.sh [OUT]            # OUT default runs/study; ~12 min on 2 idle CPU cores (docs/study.md)
#   recipes/study/run.sh OUT --dry-run    # validate every run and print what would run; run nothing
# Running it again skips finished runs and resumes an interrupted one (ftkit sweep does).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/study}
DRY_RUN=${2:-}
FTKIT=${FTKIT:-ftkit}
PYTHON=${PYTHON:-python}

# method (recipe name) and its learning rates: half-decade steps around where each method learns
declare -A LRS=(
  [full]=3e-5,1e-4,3e-4
  [lora-r8]=1e-3,3e-3,1e-2
  [lora-r64]=3e-4,1e-3,3e-3
  [qlora-r8]=1e-3,3e-3,1e-2
)
METHODS=(lora-r8 full qlora-r8 lora-r64)  # cheapest first

for method in "${METHODS[@]}"; do
  $FTKIT sweep "recipes/study/$method.yaml" --grid "train.lr=${LRS[$method]}" --out "$OUT/$method" $DRY_RUN
done
[ "$DRY_RUN" = "--dry-run" ] && exit 0

best_run() {  # the run of a sweep with the lowest best val_loss, from its compare.json
  "$PYTHON" -c 'import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["runs"] if r["best_val_loss"] is not None]
print(min(rows, key=lambda r: r["best_val_loss"])["path"])' "$OUT/$1/compare.json"
}

BEST=()
LABELS=()
for method in "${METHODS[@]}"; do
  run=$(best_run "$method")
  BEST+=("$run")
  LABELS+=(--label "$method")
  if ! ls "$run"/eval-*.json >/dev/null 2>&1; then
    $FTKIT eval "$run" --batch-size 8 >/dev/null  # greedy generation: 8 prompts a batch
  fi
done
$FTKIT compare "${BEST[@]}" "${LABELS[@]}" --out "$OUT/compare" --html --overwrite
