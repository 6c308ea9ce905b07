"""Render docs/recipe.md's recipe reference from the recipe schema, so the two cannot drift.

    python scripts/gen_recipe_reference.py           rewrite docs/recipe.md between the markers
    python scripts/gen_recipe_reference.py --check   exit 1 if docs/recipe.md is out of date

One table per section (key, type, default, description), taken from the pydantic
fields of `ftkit.recipe.schema.Recipe`; the `method` section lists the keys every
method has, then one table per entry of `ftkit.methods.REGISTRY` with its own keys.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from ftkit.methods import REGISTRY
from ftkit.recipe.describe import default_text as _default_text
from ftkit.recipe.describe import is_optional as _is_optional
from ftkit.recipe.describe import model_in as _model_in
from ftkit.recipe.describe import type_text
from ftkit.recipe.schema import Recipe

START = "<!-- recipe-reference:start -->"
END = "<!-- recipe-reference:end -->"
PAGE = Path(__file__).resolve().parents[1] / "docs" / "recipe.md"


def render_reference() -> str:
    """The markdown placed between the page's markers (ends with a newline)."""
    parts = [
        "Generated from `ftkit/recipe/schema.py` by `scripts/gen_recipe_reference.py`; do not edit by hand.",
        "Unknown keys are errors. `ftkit validate RECIPE` prints a recipe with every default filled in.",
        "",
        "### Top level",
        "",
        _table([(name, info) for name, info in Recipe.model_fields.items()], link_sections=True),
    ]
    for name, info in Recipe.model_fields.items():
        if name == "method":
            parts.extend(_method_sections())
        else:
            parts.extend(_model_sections(name, info.annotation))
    return "\n".join(parts).rstrip("\n") + "\n"


def _model_sections(path: str, annotation: Any) -> list[str]:
    """`### path` with the model's table, then its nested models, depth first."""
    model = _model_in(annotation)
    if model is None:
        return []
    parts = ["", f"### `{path}`", "", _doc(model), "", _table(list(model.model_fields.items()), prefix=path)]
    for name, info in model.model_fields.items():
        parts.extend(_model_sections(f"{path}.{name}", info.annotation))
    return parts


def _method_sections() -> list[str]:
    names = " \\| ".join(f"`{name}`" for name in REGISTRY)
    parts = [
        "",
        "### `method`",
        "",
        "How the model is adapted. `method.name` picks the method; each method adds its own keys below.",
        "",
        "| key | type | default | description |",
        "|---|---|---|---|",
        f"| `name` | {names} | **required** | The method; one of the registered methods below. |",
    ]
    for name, entry in REGISTRY.items():
        own = [(key, info) for key, info in entry.config.model_fields.items() if key != "name"]
        parts += ["", f"#### `method.name: {name}`", "", _doc(entry.config), ""]
        parts.append(_table(own, prefix="method") if own else "No keys besides `name`.")
    return parts


def _table(fields: list[tuple[str, FieldInfo]], prefix: str = "", link_sections: bool = False) -> str:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, info in fields:
        path = f"{prefix}.{name}" if prefix else name
        type_text = _type_text(info.annotation, info.metadata)
        if link_sections and (_model_in(info.annotation) is not None or info.discriminator):
            type_text = f"section (see `{path}`)"
        elif _model_in(info.annotation) is not None:
            type_text = f"mapping (see `{path}`)" + (" \\| null" if _is_optional(info.annotation) else "")
        rows.append(f"| `{name}` | {type_text} | {_default_text(info)} | {_escape(info.description or '')} |")
    return "\n".join(rows)


def _type_text(annotation: Any, metadata: list[Any] = ()) -> str:
    return _escape(type_text(annotation, metadata))


def _doc(model: type[BaseModel]) -> str:
    return _escape((model.__doc__ or "").strip().splitlines()[0] if model.__doc__ else "")


def _escape(text: str) -> str:
    """Table cells: a bare `|` would split the cell, and `<name>` would vanish as an HTML tag."""
    return text.replace("\\|", "|").replace("|", "\\|").replace("<", "&lt;")


def update_page_text(page: str, reference: str) -> str:
    """`page` with the text between the markers replaced by `reference`."""
    start, end = page.find(START), page.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the page has no {START} ... {END} markers")
    return page[: start + len(START)] + "\n" + reference + page[end:]


def is_page_current(page_path: Path = PAGE) -> bool:
    """True when the reference in `page_path` is what `render_reference()` gives now."""
    text = page_path.read_text(encoding="utf-8")
    return update_page_text(text, render_reference()) == text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is out of date; write nothing")
    parser.add_argument("--page", type=Path, default=PAGE, help="the page to update (default: docs/recipe.md)")
    args = parser.parse_args(argv)
    if args.check:
        if is_page_current(args.page):
            return 0
        print(
            f"{args.page}: recipe reference is out of date; run python scripts/gen_recipe_reference.py",
            file=sys.stderr,
        )
        return 1
    text = args.page.read_text(encoding="utf-8")
    args.page.write_text(update_page_text(text, render_reference()), encoding="utf-8")
    print(f"wrote the recipe reference into {args.page}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
