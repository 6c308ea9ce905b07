"""One table of methods: every row goes through the same end-to-end checks.

Each row: method name → recipe overrides that make the method learn the tiny task
in 20 steps on micro-llama. LRs are high because the base is random-init and tiny.
"""

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
}
