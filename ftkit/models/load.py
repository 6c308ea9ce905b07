"""Base model + tokenizer building: hub id, local directory, or a built-in tiny model.

Every model goes through one path, `transformers.AutoModelForCausalLM.from_pretrained`:
a built-in model is first materialised as an ordinary model directory (config,
safetensors, tokenizer), so QLoRA quantization, dtype handling and reloading by
users work exactly as for a hub model.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import torch
import transformers
from peft import PeftModel
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
)
from transformers.utils import is_flash_attn_2_available

from ftkit.errors import ModelError
from ftkit.io import messages
from ftkit.models import hf_files
from ftkit.models.builtin import build_byte_tokenizer, builtin_config, is_builtin, label_config, materialize_builtin
from ftkit.models.gguf import local_model
from ftkit.models.hf_files import is_adapter_dir
from ftkit.recipe.schema import ModelSection


def load_model_config(cfg: ModelSection) -> Any:
    """The model's transformers config alone (config.json, no weights): for checks before loading."""
    cfg = local_model(cfg)
    if is_builtin(cfg.name):
        return builtin_config(cfg.name)
    local = Path(cfg.name).expanduser()
    if local.is_dir() and is_adapter_dir(local):
        # an adapter (e.g. an SFT run's final/): the model is its base with the adapter merged in
        return load_model_config(cfg.model_copy(update={"name": _adapter_base(local)}))
    if local.is_dir():
        _check_remote_code(local, cfg)
    try:
        return AutoConfig.from_pretrained(
            cfg.name, trust_remote_code=cfg.trust_remote_code, local_files_only=local.is_dir(), revision=cfg.revision
        )
    except (OSError, ValueError) as err:
        raise ModelError(f"model.name: cannot load the config of {cfg.name!r}: {str(err).splitlines()[0]}") from err


def skeleton(config: Any, trust_remote_code: bool = False, labels: list[str] | None = None) -> Any:
    """The model's modules on the meta device: names, shapes and dtypes, no memory and no weights.

    What a check before loading needs (a method's target modules, `ftkit plan`'s counts). With
    `labels` it is the classifier (AutoModelForSequenceClassification, with its `score` head)."""
    with torch.device("meta"):
        if labels is not None:
            config = copy.deepcopy(config)
            config.update(label_config(labels))
            return AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust_remote_code)
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def resolve_dtype(name: str, device_type: str) -> Any:
    """`auto` → bfloat16 on a bf16-capable GPU, float32 elsewhere (CPU matmuls in bf16 are slow)."""
    if name == "auto":
        if device_type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def _check_remote_code(path: Path, cfg: ModelSection) -> None:
    if cfg.trust_remote_code or not hf_files.is_model_dir(path):
        return
    # read raw: AutoConfig would import (run) the code auto_map names
    if "auto_map" in hf_files.raw_model_config(path):
        raise ModelError(
            f"model.trust_remote_code: {path} ships its own Python code (auto_map in config.json); "
            "set model.trust_remote_code: true only if you trust its authors"
        )


def _load_kwargs(cfg: ModelSection, device_type: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "dtype": resolve_dtype(cfg.dtype, device_type),
        "trust_remote_code": cfg.trust_remote_code,
        "attn_implementation": cfg.attn_implementation,
    }
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if cfg.quantization is not None:
        q = cfg.quantization
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.type,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=resolve_dtype(q.compute_dtype, device_type),
            bnb_4bit_quant_storage=torch.uint8,
        )
        # 4-bit weights are placed at load time; accelerate must not move them afterwards.
        kwargs["device_map"] = {"": torch.cuda.current_device() if device_type == "cuda" else "cpu"}
    return kwargs


def quiet_transformers() -> None:
    """No progress bars or warnings from transformers while ftkit loads a model (stderr is ftkit's)."""
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def load_tokenizer(cfg: ModelSection) -> Any:
    """The tokenizer of a model section: the byte tokenizer of a built-in model, else the hub or local
    model's own, with a pad token distinct from EOS. The one tokenizer loader: training, eval,
    generate and merge all come here (a run's final/ is a local model folder)."""
    if is_builtin(cfg.name):
        return build_byte_tokenizer()
    cfg = local_model(cfg)
    quiet_transformers()
    local = Path(cfg.name).expanduser()
    if local.is_dir():
        _check_remote_code(local, cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            cfg.name, trust_remote_code=cfg.trust_remote_code, local_files_only=local.is_dir(), revision=cfg.revision
        )
    except (OSError, ValueError) as err:
        raise ModelError(f"model.name: cannot load the tokenizer of {cfg.name!r}: {str(err).splitlines()[0]}") from err
    ensure_pad_token(tokenizer)
    return tokenizer


def build_model(
    cfg: ModelSection,
    device_type: str,
    seed: int,
    base_dir: Path | None = None,
    tokenizer: Any = None,
    labels: list[str] | None = None,
    config_changes: dict[str, Any] | None = None,
) -> tuple[Any, Any, str]:
    """Load `(model, tokenizer, base_path_or_id)` as the recipe's model section says.

    A built-in model is materialised into `base_dir` (the run's `base/`) so the
    result can be loaded without ftkit. A local directory never touches the network.
    A tokenizer already loaded (with its pad token fixed) may be passed in.
    With `labels` (a classifier's class names, id order) the model is loaded with
    AutoModelForSequenceClassification: num_labels / id2label / label2id in its config,
    and a head (`score`) newly initialised unless the checkpoint has one of that shape.
    `config_changes` (a method's `model_config_changes`, e.g. RoPE scaling) are set in the
    config before the weights load; the changed base is then written to `base_dir` and
    returned as the base, so an adapter pointing there reloads the model that trained.
    """
    quiet_transformers()
    cfg = local_model(cfg)
    source = cfg.name
    if is_adapter_dir(Path(source).expanduser()):
        if labels is not None:
            raise ModelError(
                f"model.name: {source} is an adapter; a classifier cannot start from one here: merge it first "
                "(ftkit merge RUN --out DIR) and set model.name to the merged directory"
            )
        return _merge_adapter(cfg, Path(source).expanduser(), device_type, seed, base_dir, tokenizer, config_changes)
    if is_builtin(source):
        if base_dir is None:
            base_dir = Path(tempfile.mkdtemp(prefix="ftkit-base-"))
        source = str(materialize_builtin(cfg.name, base_dir, seed, labels))
    local = Path(source).expanduser()
    is_local = local.is_dir()
    if is_local:
        _check_remote_code(local, cfg)
    elif Path(source).suffix or source.startswith((".", "/", "~")):
        raise ModelError(f"model.name: {source} is neither a local model directory nor a hub id")
    check_attention(cfg, device_type)
    kwargs = _load_kwargs(cfg, device_type)
    if cfg.trust_remote_code:
        print(f"warning: model.trust_remote_code is true: running code shipped with {source}", file=messages())
    try:
        if tokenizer is None:
            tokenizer = load_tokenizer(cfg.model_copy(update={"name": source}))
        # from_pretrained sets keyword arguments that name config attributes on the loaded config
        changes = config_changes or {}
        if labels is not None:
            label_kwargs = label_config(labels)
            model = AutoModelForSequenceClassification.from_pretrained(
                # a checkpoint with another head size (a classifier of other labels) gets a new head
                source,
                local_files_only=is_local,
                ignore_mismatched_sizes=True,
                **label_kwargs,
                **kwargs,
                **changes,
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(source, local_files_only=is_local, **kwargs, **changes)
    except OSError as err:
        raise ModelError(f"model.name: cannot load {source!r}: {str(err).splitlines()[0]}") from err
    if cfg.quantization is not None and device_type == "cpu":
        keep_4bit_layout(model)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if config_changes and base_dir is not None:
        _save_changed_base(model, tokenizer, local, base_dir)
        local, is_local = base_dir, True
    if cfg.gradient_checkpointing:  # true or "offload" (ftkit.tasks.losses moves the kept inputs to CPU)
        # non-reentrant: works with frozen inputs (LoRA) and with save_on_cpu's hooks
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model, tokenizer, str(local.resolve()) if is_local else source


def keep_4bit_layout(model: Any) -> int:
    """Keep every 4-bit layer on bitsandbytes' training layout on CPU; returns how many layers.

    On a CPU with AVX512-BF16, bitsandbytes' `Linear4bit.forward` repacks its weight the first
    time it runs in eval mode on an input without grad (a mid-run evaluation, a sample): the
    double-quantized absmax is dequantized and cast to bf16, the layout changes, and every later
    forward, training included, takes the inference kernel (`gemv_4bit`) on those bf16 scales. So a
    run with evaluations trained on other numbers than one without (issue 15: step-7 loss 3.6338 vs
    3.6051). The repacking is gated by the layer's own `support_avx512bf16_for_cpu` flag (set at
    construction from the CPU's features); turning it off keeps one kernel and one set of scales for
    training, evaluation and generation alike. The cost is CPU inference speed only.
    """
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def _save_changed_base(model: Any, tokenizer: Any, source: Path, base_dir: Path) -> None:
    """Write the base with its changed config to `base_dir`: only config.json when the weights are
    already there (a built-in base materialised in it), else the whole model (a copy of the weights)."""
    base_dir.mkdir(parents=True, exist_ok=True)
    if source.resolve() == base_dir.resolve():
        model.config.save_pretrained(base_dir)
    else:
        model.save_pretrained(base_dir, safe_serialization=True)
        tokenizer.save_pretrained(base_dir)


def check_attention(cfg: ModelSection, device_type: str) -> None:
    """ModelError naming model.attn_implementation when its kernel cannot run here."""
    if cfg.attn_implementation != "flash_attention_2":
        return
    if device_type != "cuda" or not is_flash_attn_2_available():
        raise ModelError(
            "model.attn_implementation: flash_attention_2 needs a CUDA GPU and the flash-attn package "
            "(pip install flash-attn); use sdpa, which needs neither"
        )


def decoder_layers(model: Any) -> Any:
    """The ModuleList of decoder blocks (the longest ModuleList with num_hidden_layers entries), or None."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers]
    return lists[0] if lists else None


def compile_layers(model: Any) -> int:
    """Compile every decoder layer in place (`nn.Module.compile`); returns how many.

    Per layer rather than the whole model: the layers are identical, so one compiled graph
    serves them all (compile time does not grow with depth), and the loss, the optimizer
    and peft's wrapper stay in eager mode, where data-dependent shapes cost no recompiles.
    """
    layers = decoder_layers(model)
    if layers is None:
        raise ModelError("model.torch_compile: cannot find the model's decoder layers to compile; remove it")
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def _merge_adapter(
    cfg: ModelSection,
    adapter_dir: Path,
    device_type: str,
    seed: int,
    base_dir: Path | None,
    tokenizer: Any,
    config_changes: dict[str, Any] | None = None,
) -> tuple[Any, Any, str]:
    """`model.name` is an adapter (e.g. an SFT run's final/): its base with the adapter merged in.

    So a second stage (DPO after SFT) starts from the fine-tuned model, and its reference
    (the new adapter disabled) is that model. The merged weights are saved to `base_dir` (the
    run's base/), which the new adapter's config points to, so it loads without ftkit.
    """
    if cfg.quantization is not None:
        raise ModelError(
            f"model.name: {adapter_dir} is an adapter, which cannot be merged into a 4-bit base; "
            "use method.name: lora (16/32-bit base) for this stage"
        )
    base_cfg = cfg.model_copy(update={"name": _adapter_base(adapter_dir)})
    model, tokenizer, _ = build_model(base_cfg, device_type, seed, None, tokenizer, config_changes=config_changes)
    try:
        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    except (OSError, ValueError, RuntimeError) as err:
        raise ModelError(f"model.name: cannot apply the adapter {adapter_dir}: {str(err).splitlines()[0]}") from err
    out = base_dir if base_dir is not None else Path(tempfile.mkdtemp(prefix="ftkit-base-"))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return model, tokenizer, str(out.resolve())


def _adapter_base(adapter_dir: Path) -> str:
    base = hf_files.adapter_base(adapter_dir)
    if base is None:
        raise ModelError(f"model.name: {adapter_dir}/{hf_files.ADAPTER_CONFIG} names no base_model_name_or_path")
    return base


#: pad tokens some vocabularies carry for exactly this purpose
PAD_TOKENS = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]")


def ensure_pad_token(tokenizer: Any) -> None:
    """Give the tokenizer a pad token without ever adding one to the vocabulary.

    Padding never decides what trains or what is attended to: `collate` builds the attention
    mask and the labels from each example's length, so EOS keeps training even when the pad
    id equals it. A new token would grow the embeddings, and peft would then save the whole
    embedding and lm_head with every adapter (for SmolLM2, 246 MB instead of 20 MB) that no
    longer loads on the stock base. So a tokenizer without its own pad token (or whose pad is
    its EOS) pads with a pad token of its vocabulary, else another special token that is not EOS
    (its unk, bos, ...), else EOS itself.
    """
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    vocab = tokenizer.get_vocab()
    specials = [tokenizer.unk_token, *tokenizer.all_special_tokens]
    for token in (*PAD_TOKENS, *specials):
        if token and token in vocab and token != tokenizer.eos_token:
            tokenizer.pad_token = token
            return
    tokenizer.pad_token = tokenizer.eos_token


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights are counted as their element count."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        # bitsandbytes packs two 4-bit values per uint8 element
        if param.dtype.is_floating_point is False and hasattr(param, "quant_state"):
            n *= 2
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total
