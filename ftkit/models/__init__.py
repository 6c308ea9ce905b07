"""Models: one path from a recipe's model section (hub id, local folder, built-in) to a model and tokenizer.

load      build_model(recipe.model, ...) -> (model, tokenizer, base): dtype, 4-bit NF4, an adapter base merged
builtin   the built-in tiny Llama models and their byte tokenizer, built in code
target    RUN_OR_MODEL of eval / generate / merge -> a Target (run, adapter, model), and loading it
"""
