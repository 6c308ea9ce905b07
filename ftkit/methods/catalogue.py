"""`ftkit methods`: the registered methods and their recipe keys, as plain text from the schema.

    list_methods()            every method with its one-line summary
    describe_method(name)     its formula, default LR, and keys (type, default, description)
    describe_peft_type(type)  the keys of one peft tuner for `method: {name: peft, type: ...}`

Text comes from the config classes (docstring, `summary`, field descriptions) and, for
peft types, from peft's own dataclass fields and help texts, so it cannot drift.
"""

from __future__ import annotations

import dataclasses
import difflib
import io

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ftkit.errors import RecipeError
from ftkit.methods import REGISTRY
from ftkit.recipe.describe import default_text, plain_type, type_text, yaml_scalar
from ftkit.recipe.peft_types import REFUSED, config_class, fields, peft_types
from ftkit.recipe.suggestions import did_you_mean


def list_methods() -> str:
    """Every registered method and its one-line summary, as a plain-text table (no colour, no wrapping)."""
    table = Table("method", "summary", box=None, pad_edge=False, header_style=None)
    for name, entry in REGISTRY.items():
        table.add_row(name, Text(entry.config.summary))  # Text: a summary's brackets are not rich markup
    return _render(table) + "\n`ftkit methods NAME` shows a method's recipe keys.\n"


def _render(table: Table) -> str:
    """`table` as plain text for stdout: one line per row, however wide, without trailing padding."""
    buffer = io.StringIO()
    # wide enough that no row wraps: the output is read by people and by grep alike
    Console(file=buffer, width=10_000, color_system=None, force_terminal=False, highlight=False).print(table)
    return "".join(line.rstrip() + "\n" for line in buffer.getvalue().splitlines())


def describe_method(name: str) -> str:
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, list(REGISTRY), n=1, cutoff=0.6)
        raise RecipeError([f"methods: unknown method {name!r}{did_you_mean(close)}; known: {', '.join(REGISTRY)}"])
    config = REGISTRY[name].config
    doc = " ".join((config.__doc__ or "").split())
    lines = [f"{name}: {config.summary}", "", doc, ""]
    lines.append(f"default train.lr: {config.default_lr:g} ({config.default_lr_reason})")
    if name != "peft":
        merge = getattr(config, "merge_note", None) or ("yes" if config.mergeable else "no")  # medusa: per base
        lines.append(f"mergeable into the base weights: {merge}")
    rows = [("key", "type", "default", "description")]
    for key, info in config.model_fields.items():
        rows.append(
            (key, _plain(type_text(info.annotation, info.metadata)), _plain(default_text(info)), info.description or "")
        )
    lines += ["", *_table(rows)]
    if name == "peft":
        lines += [
            "",
            "Other keys are the fields of the peft config for `type`; `ftkit methods peft TYPE` lists them.",
            f"types in the installed peft: {', '.join(peft_types())}",
        ]
    return "\n".join(lines) + "\n"


def describe_peft_type(peft_type: str) -> str:
    known = peft_types()
    if peft_type.lower() not in known:
        close = difflib.get_close_matches(peft_type.lower(), known, n=1, cutoff=0.6)
        raise RecipeError([f"methods: unknown peft type {peft_type!r}{did_you_mean(close)}; known: {', '.join(known)}"])
    kind = peft_type.lower()
    cls = config_class(kind)
    lines = [f"peft type {kind}: peft.{cls.__name__}, as `method: {{name: peft, type: {kind}, ...}}`", ""]
    if kind in REFUSED:
        lines += [f"not available through the generic entry: {REFUSED[kind]}", ""]
    rows = [("key", "type", "default", "description")]
    for f in fields(kind):
        kind_text = _plain(plain_type(f.annotation)) if f.annotation is not None else "?"
        default = "required" if f.default is dataclasses.MISSING else yaml_scalar(f.default)
        rows.append((f.name, kind_text, default, f.help))
    return "\n".join(lines + _table(rows)) + "\n"


def _plain(text: str) -> str:
    return text.replace("`", "").replace("**", "")


def _table(rows: list[tuple[str, str, str, str]]) -> list[str]:
    """Left-aligned columns; the description (last column) runs to the end of the line."""
    widths = [min(max(len(row[i]) for row in rows), limit) for i, limit in ((0, 28), (1, 36), (2, 24))]
    out = []
    for row in rows:
        cells = [row[i].ljust(widths[i]) for i in range(3)]
        out.append("  ".join([*cells, row[3]]).rstrip())
    return out
