"""Bottleneck adapters (Houlsby et al. 2019, Pfeiffer et al. 2020) and AdapterFusion (Pfeiffer et al.
2021) as plain torch modules hung on a decoder's sub-modules with forward hooks.

An adapter is a residual bottleneck on a sub-layer's output h (hidden size d, bottleneck m = d / reduction):

    h' = h + W_up · act(W_down · h + b_down) + b_up          W_down ∈ R^{m×d}, W_up ∈ R^{d×m}

W_up and b_up start at zero, so a freshly adapted model computes exactly the base's function.
Where it sits, per decoder layer `model.layers[i]`:

    houlsby    after the attention block (`self_attn`'s output, before the layer's residual add)
               and after the feed-forward block (`mlp`'s output)
    pfeiffer   after the feed-forward block only

Nothing in transformers is patched: each adapter is a child module of the sub-module it follows
(`model.layers.3.mlp.bottleneck`), run by a forward hook on that sub-module, so its weights have
ordinary state-dict names and any model with the Llama/Mistral/Qwen layout takes it. The adapters
compute in fp32 whatever the base's dtype (their input is cast up, their output back down).

AdapterFusion combines N trained adapters, frozen, at every site with a trained attention over
their outputs (`Fusion`; see its docstring for how it compares with AdapterHub's).

final/ of such a run holds `bottleneck_model.safetensors` (the adapters, the fusion layers and any
`modules_to_save`, by state-dict name) and `bottleneck_config.json` (what `attach` needs to rebuild
them on the base). This module is the only reader and writer of those two files.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ftkit.errors import ModelError
from ftkit.rundir import BOTTLENECK_CONFIG, BOTTLENECK_WEIGHTS

#: which sub-modules of a decoder layer get an adapter, per config
SITES = {"houlsby": ("self_attn", "mlp"), "pfeiffer": ("mlp",)}
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU}
#: child-module names under a site
ADAPTER = "bottleneck"
FUSION = "bottleneck_fusion"
FORMAT = "ftkit-bottleneck-1"
#: why `ftkit merge` / `export` / `merge --config` refuse these runs
NOT_MERGEABLE = (
    "bottleneck adapters (method adapter / adapter_fusion) add h + W_up·act(W_down·h) after a sub-layer, which is "
    "not linear in the base weights, so they cannot be folded into them; use the run itself with ftkit eval / "
    "generate, or train a mergeable method (lora)"
)


class Bottleneck(nn.Module):
    """f(h) = W_up · act(W_down · h + b_down) + b_up in fp32; the residual is added by the site."""

    def __init__(self, hidden: int, reduction_factor: float, non_linearity: str):
        super().__init__()
        width = max(1, int(hidden // reduction_factor))
        self.down = nn.Linear(hidden, width, dtype=torch.float32)
        self.act = ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(width, hidden, dtype=torch.float32)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(h.to(self.down.weight.dtype))))


class Fusion(nn.Module):
    """AdapterFusion at one site: attention of the site's hidden state over N frozen adapters' outputs.

        q = Q h,  k_i = K f_i(h),  p = softmax_i(q · k_i / √d),  h' = h + Σ_i p_i · V f_i(h)

    with f_i the i-th adapter's bottleneck (its output without the residual). Q starts at zero, so
    p starts uniform; V starts at the identity, so training starts at h + mean_i f_i(h), the
    average of the adapters. AdapterHub's `BertFusion` ("dynamic" config) differs in three ways:
    its keys and values are the adapters' outputs including the residual (h + f_i(h)) and it adds h
    once more after; it divides by a temperature T (1.0 by default) instead of √d; and it
    initialises Q, K, V randomly (value_initialized is off by default) with an optional penalty
    pulling V towards the identity. Here the residual is added once, the 1/√d scaling is the usual
    scaled dot product, and the identity V with zero Q makes step 0 the mean of the adapters.

    When `record` is on, every forward adds the softmax weights, summed over tokens, to `weight_sum`
    (and the token count to `tokens`): how the fusion weighs each adapter on the data it saw.
    """

    def __init__(self, hidden: int, n_adapters: int):
        super().__init__()
        self.query = nn.Linear(hidden, hidden, dtype=torch.float32)
        self.key = nn.Linear(hidden, hidden, dtype=torch.float32)
        self.value = nn.Linear(hidden, hidden, bias=False, dtype=torch.float32)
        nn.init.zeros_(self.query.weight)
        nn.init.zeros_(self.query.bias)
        nn.init.normal_(self.key.weight, std=0.02)
        nn.init.zeros_(self.key.bias)
        with torch.no_grad():
            self.value.weight.copy_(torch.eye(hidden))
        self.scale = 1.0 / math.sqrt(hidden)
        self.record = False
        self.register_buffer("weight_sum", torch.zeros(n_adapters, dtype=torch.float64), persistent=False)
        self.register_buffer("tokens", torch.zeros((), dtype=torch.float64), persistent=False)

    def forward(self, h: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """h (..., d) fp32; outputs (..., N, d) the adapters' f_i(h); returns Σ_i p_i · V f_i(h)."""
        q = self.query(h).unsqueeze(-2)  # (..., 1, d)
        k = self.key(outputs)  # (..., N, d)
        p = torch.softmax((q * k).sum(-1) * self.scale, dim=-1)  # (..., N)
        if self.record:
            flat = p.detach().reshape(-1, p.shape[-1])
            self.weight_sum += flat.sum(0).double()
            self.tokens += flat.shape[0]
        return self.value((p.unsqueeze(-1) * outputs).sum(-2))


class FusedAdapters(nn.Module):
    """N frozen bottlenecks and the fusion over them, at one site."""

    def __init__(self, hidden: int, adapter_configs: list[dict]):
        super().__init__()
        self.adapters = nn.ModuleList(
            Bottleneck(hidden, c["reduction_factor"], c["non_linearity"]) for c in adapter_configs
        )
        self.fusion = Fusion(hidden, len(adapter_configs))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(torch.float32)
        outputs = torch.stack([adapter(x) for adapter in self.adapters], dim=-2)
        return self.fusion(x, outputs)


# ---------------------------------------------------------------- where they go


def decoder_layers(model: Any) -> tuple[str, list[Any]] | None:
    """(dotted name, layers) of the model's decoder layers: the first ModuleList named `layers`."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "layers" and isinstance(module, nn.ModuleList) and len(module):
            return name, list(module)
    return None


def layout_problem(model: Any, sites: tuple[str, ...], method: str) -> str | None:
    """Why `model` (may be a meta skeleton) cannot take adapters at `sites`; None when it can."""
    found = decoder_layers(model)
    kind = type(model).__name__
    if found is None:
        return (
            f"method.name: {method} wraps each decoder layer's {' and '.join(sites)}; {kind} has no "
            "model.layers (a ModuleList of decoder layers); use a model with the Llama/Mistral/Qwen layout"
        )
    name, layers = found
    for site in sites:
        if not all(isinstance(getattr(layer, site, None), nn.Module) for layer in layers):
            return (
                f"method.name: {method} wraps each decoder layer's {' and '.join(sites)}; {kind} has no "
                f"{name}[i].{site}; use a model with the Llama/Mistral/Qwen layout"
            )
    return None


def hidden_size(model: Any) -> int:
    return int(model.get_input_embeddings().embedding_dim)


def _site_hook(child: str):
    def add(module: nn.Module, args: tuple, output: Any) -> Any:
        adapter = getattr(module, child)
        if getattr(adapter, "disabled", False):
            return output
        h = output[0] if isinstance(output, tuple) else output
        h = h + adapter(h).to(h.dtype)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    return add


def _attach_site(module: nn.Module, child: str, adapter: nn.Module) -> None:
    module.add_module(child, adapter)
    module.register_forward_hook(_site_hook(child))


def add_adapters(model: Any, config: dict) -> Any:
    """Hang a fresh bottleneck (`config`: {config, reduction_factor, non_linearity}) after every site."""
    sites = SITES[config["config"]]
    problem = layout_problem(model, sites, "adapter")
    if problem:
        raise ModelError(problem)
    hidden, device = hidden_size(model), model.get_input_embeddings().weight.device
    for layer in decoder_layers(model)[1]:
        for site in sites:
            adapter = Bottleneck(hidden, config["reduction_factor"], config["non_linearity"]).to(device)
            _attach_site(getattr(layer, site), ADAPTER, adapter)
    return model


def add_fusion(model: Any, adapter_configs: list[dict]) -> Any:
    """Hang N bottlenecks and a fusion after every site any of them uses (the union of their sites;
    an adapter without a site there — pfeiffer at attention — contributes f_i = 0 there: it is
    built, never trained, its up-projection zero)."""
    sites = tuple(s for s in ("self_attn", "mlp") if any(s in SITES[c["config"]] for c in adapter_configs))
    problem = layout_problem(model, sites, "adapter_fusion")
    if problem:
        raise ModelError(problem)
    hidden, device = hidden_size(model), model.get_input_embeddings().weight.device
    for layer in decoder_layers(model)[1]:
        for site in sites:
            _attach_site(getattr(layer, site), FUSION, FusedAdapters(hidden, adapter_configs).to(device))
    return model


def adapter_modules(model: Any) -> list[nn.Module]:
    """Every site module this file added (bottlenecks and fused sites)."""
    return [m for m in model.modules() if isinstance(m, (Bottleneck, FusedAdapters)) and not _nested(m, model)]


def _nested(module: nn.Module, model: Any) -> bool:
    return isinstance(module, Bottleneck) and any(
        module in list(f.adapters) for f in model.modules() if isinstance(f, FusedAdapters)
    )


def fusions(model: Any) -> list[Fusion]:
    return [m for m in model.modules() if isinstance(m, Fusion)]


@contextlib.contextmanager
def disabled(model: Any) -> Iterator[Any]:
    """A context in which `model` computes as its base: every adapter site passes h through."""
    sites = adapter_modules(model)
    for site in sites:
        site.disabled = True
    try:
        yield model
    finally:
        for site in sites:
            site.disabled = False


# ---------------------------------------------------------------- final/


def trained_state(model: Any, saved_modules: list[str] | None = None) -> dict[str, torch.Tensor]:
    """What final/ keeps: every tensor of the adapter sites, and of the modules trained in full."""
    names = {id(p): n for n, p in model.named_parameters()}
    state = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        in_site = f".{ADAPTER}." in f".{name}" or f".{FUSION}." in f".{name}"
        saved = any(f".{m}." in f".{name}" for m in saved_modules or [])
        if in_site or saved:
            state[names.get(id(tensor), name)] = tensor.detach().to("cpu").contiguous()
    return state


def save(model: Any, out_dir: Path, config: dict) -> None:
    """Write final/: the weights (`trained_state`) and the config `attach` rebuilds them from."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = trained_state(model, config.get("modules_to_save"))
    # tied tensors (an embedding shared with the head) are stored once
    seen: dict[int, str] = {}
    unique = {}
    for name, tensor in tensors.items():
        key = tensor.data_ptr()
        if key in seen:
            continue
        seen[key] = name
        unique[name] = tensor.clone()
    save_file(unique, str(out_dir / BOTTLENECK_WEIGHTS), metadata={"format": "pt"})
    (out_dir / BOTTLENECK_CONFIG).write_text(json.dumps({"format": FORMAT, **config}, indent=2) + "\n")


def is_bottleneck_dir(path: Path) -> bool:
    return (Path(path) / BOTTLENECK_CONFIG).is_file()


def read_config(path: Path) -> dict:
    file = Path(path) / BOTTLENECK_CONFIG
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"{file}: cannot read it ({err})") from None
    if config.get("format") != FORMAT:
        raise ModelError(f"{file}: not a bottleneck-adapter config ({FORMAT}); was it written by ftkit train?")
    return config


def attach(model: Any, path: Path) -> Any:
    """The base `model` with the adapters (or fusion) saved in `path` (a final/ directory) on it."""
    config = read_config(path)
    if config["method"] == "adapter_fusion":
        add_fusion(model, config["adapters"])
    else:
        add_adapters(model, config)
    tensors = load_file(str(Path(path) / BOTTLENECK_WEIGHTS))
    try:
        result = model.load_state_dict(tensors, strict=False)
    except RuntimeError as err:  # torch's size-mismatch report: adapters trained on another base
        first = str(err).strip().splitlines()[0]
        raise ModelError(f"{path}: the adapters do not fit this base model ({first}); check --base") from err
    if result.unexpected_keys:
        raise ModelError(
            f"{path}/{BOTTLENECK_WEIGHTS}: tensors this base does not have ({', '.join(result.unexpected_keys[:3])}); "
            "check --base"
        )
    device = model.get_input_embeddings().weight.device
    for site in adapter_modules(model):
        site.to(device)
    return model
