"""GGUF files as a model source: dequantized once into a plain safetensors model folder, cached.

transformers reads GGUF (`from_pretrained(folder, gguf_file=name)`, through the `gguf` package)
and dequantizes it, but such a model refuses `save_pretrained` ("quantized with gguf") and every
load pays the dequantization again (~15 s for a 135M model). So a GGUF file is converted once:
its weights are copied into a plain model of the same config, saved with its tokenizer (chat
template included) as an ordinary model folder under the cache, and every run, eval, merge and
generate loads that folder. The folder is keyed by the file's sha256, so a changed file is a new
entry and a moved or renamed one is found again.

    $FTKIT_CACHE (default: $XDG_CACHE_HOME/ftkit, else ~/.cache/ftkit)
      gguf/<sha256[:16]>/          config.json, model.safetensors, tokenizer files
      gguf/<sha256[:16]>/ftkit-gguf.json   written last: source file, sha256, architecture

An entry is built in a temporary folder beside it and renamed into place, so a killed conversion
never leaves a half-written entry; an entry without its `ftkit-gguf.json` is refused, not used.
The cache holds fp32 weights; the recipe's `model.dtype` (and 4-bit quantization) applies when the
folder is loaded, as for any model folder.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import uuid
from pathlib import Path

import gguf
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

from ftkit.errors import ModelError
from ftkit.io import file_sha256, messages
from ftkit.models.builtin import is_packaged, packaged_file
from ftkit.recipe.schema import ModelSection

CACHE_ENV = "FTKIT_CACHE"
MARKER = "ftkit-gguf.json"
MAGIC = b"GGUF"
#: GGUF_SUPPORTED_ARCHITECTURES also lists metadata sections that are no architecture
_NOT_ARCHITECTURES = {"general", "tokenizer"}


def is_gguf_name(name: str) -> bool:
    return name.lower().endswith(".gguf")


def local_model(cfg: ModelSection) -> ModelSection:
    """`cfg` with `name` pointing at a folder transformers loads: a packaged built-in
    (builtin:smollm2-135m) or a GGUF file (`name: file.gguf`, or a folder with `gguf_file`)
    becomes its converted cache folder; any other section is returned as it is."""
    if is_packaged(cfg.name):
        path = packaged_file(cfg.name)
    elif cfg.gguf_file is not None:
        path = Path(cfg.name).expanduser() / cfg.gguf_file
    elif is_gguf_name(cfg.name):
        path = Path(cfg.name).expanduser()
    else:
        return cfg
    return cfg.model_copy(update={"name": str(converted_model_dir(path)), "gguf_file": None})


def cache_root() -> Path:
    """Where ftkit keeps converted models: $FTKIT_CACHE, else $XDG_CACHE_HOME/ftkit, else ~/.cache/ftkit."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "ftkit"


def architecture(path: Path) -> str:
    """The GGUF file's `general.architecture` (llama, qwen2, ...); ModelError when it is no GGUF file."""
    _check_magic(path)
    try:
        field = gguf.GGUFReader(str(path)).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except (KeyError, ValueError, IndexError, OSError) as err:
        raise ModelError(f"model.name: {path}: cannot read its GGUF header ({err})") from None


def _check_magic(path: Path) -> None:
    with path.open("rb") as f:
        if f.read(4) != MAGIC:
            raise ModelError(f"model.name: {path} is not a GGUF file (it does not start with the GGUF magic bytes)")


def supported_architectures() -> list[str]:
    return sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - _NOT_ARCHITECTURES)


def converted_model_dir(path: Path, cache: Path | None = None) -> Path:
    """The plain model folder made from GGUF file `path`, converting it on first use.

    ModelError (one line, naming the file) for a missing file, a file that is not GGUF, an
    architecture transformers cannot read from GGUF, or a damaged cache entry.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"model.name: GGUF file not found: {path}")
    _check_magic(path)
    stat = path.stat()
    sha256 = _sha256_of(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    entry = (cache or cache_root()) / "gguf" / sha256[:16]
    if entry.exists():
        _check_entry(entry, sha256)
        return entry
    arch = architecture(path)  # parses every tensor's header (seconds): only when converting
    if arch not in supported_architectures():
        raise ModelError(
            f"model.name: {path} holds a {arch!r} model, which transformers cannot read from GGUF; "
            f"it reads: {', '.join(supported_architectures())}"
        )
    entry.parent.mkdir(parents=True, exist_ok=True)
    print(f"converting {path.name} (GGUF, {arch}) to a plain model in {entry} (once per file)", file=messages())
    staging = entry.parent / f".{entry.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _convert(path, staging)
        marker = {"source": str(path.resolve()), "sha256": sha256, "architecture": arch}
        (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        try:
            os.rename(staging, entry)
        except OSError:
            if not entry.exists():  # not a lost race with another process converting the same file
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _check_entry(entry, sha256)
    return entry


@functools.cache
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    """The file's sha256, hashed once per process for one (path, size, mtime): a run resolves its
    model section several times (tokenizer, config check, weights) and the file is ~100 MB."""
    return file_sha256(path)


def converted_sha256(folder: str | Path) -> str | None:
    """The GGUF file's sha256 when `folder` is one of ftkit's converted cache entries, else None:
    two entries with the same sha256 hold the same model (e.g. under two $FTKIT_CACHE roots)."""
    try:
        return json.loads((Path(folder).expanduser() / MARKER).read_text()).get("sha256")
    except (OSError, ValueError, AttributeError):
        return None


def _check_entry(entry: Path, sha256: str) -> None:
    try:
        marker = json.loads((entry / MARKER).read_text())
    except (OSError, ValueError):
        marker = {}
    if marker.get("sha256") != sha256 or not (entry / "config.json").is_file():
        raise ModelError(
            f"model.name: the cache entry {entry} is incomplete or damaged (no valid {MARKER}); "
            "remove that folder and ftkit converts the GGUF file again"
        )


def _convert(path: Path, out: Path) -> None:
    """Dequantize `path` to fp32 and save it, with its tokenizer, as a plain model folder `out`."""
    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelError(f"model.name: transformers cannot load {path}: {str(err).splitlines()[0]}") from None
    # A GGUF-loaded model refuses save_pretrained, so its weights move into a plain model of the same
    # config, built on the meta device (no second random init) and filled by assignment.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = quantized.generation_config
    out.mkdir(parents=True)
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
