"""What the CLI's commands do besides `train`: each module is one command's work, called by ftkit.cli.

eval           ftkit eval: loss, accuracy, exact match of a run or model (task-aware)
generate       ftkit generate: prompts in, completions out (a classifier predicts labels)
classify       a classifier's eval and predictions (for eval and generate)
merge          ftkit merge RUN: an adapter folded into its base, verified
merge_models   ftkit merge --config: models merged (linear, slerp, ties, ...) or layers stacked
extract        ftkit extract: a LoRA adapter from a full fine-tune, by SVD
compare        ftkit compare: runs side by side (curves, table, verdict), refused across tasks or val sets
sweep          ftkit sweep: a grid of recipe values, one child `ftkit train` per point, then compare
"""
