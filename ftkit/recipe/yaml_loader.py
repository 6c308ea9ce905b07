"""Safe YAML for recipes: plain data only, with the source line of every key.

`load_yaml(text)` returns the data and a map from key path to line, so that a schema
error at ('train', 'lerning_rate') can be cited as `recipe.yaml:7`. It differs from
`yaml.safe_load` in four ways, each fixing a trap users hit with other tools:

- `2e-4`, `1e5` are floats (YAML 1.1, which PyYAML follows, wants a dot: `2.0e-4`);
- a key given twice in one mapping is a problem (PyYAML silently keeps the last);
- any tag outside the standard YAML types (`!!python/...`, `!custom`) is refused,
  because a recipe is data and must never name code;
- the source text of every plain scalar is kept, so a bare `no` that YAML turned into
  `false` can be reported as "quote it".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

Path = tuple[Any, ...]  # a key path into the loaded data, e.g. ('train', 'lr') or ('method', 'target_modules', 0)

# YAML 1.1 floats need a dot (`2.0e-4`) and a signed exponent; YAML 1.2 and every
# other tool read `2e-4` and `1e5` as numbers, so we do too.
_FLOAT_WITHOUT_DOT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$")
_FLOAT_TAG = "tag:yaml.org,2002:float"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlError(Exception):
    """The text is not a readable recipe document; `line` is 1-based."""

    def __init__(self, line: int, message: str):
        self.line = line
        self.message = message
        super().__init__(f"line {line}: {message}")


@dataclass(frozen=True)
class DuplicateKey:
    path: Path
    first_line: int
    line: int


@dataclass
class LoadedYaml:
    """Data from one YAML document and where each part of it came from."""

    data: Any
    root_line: int = 1
    lines: dict[Path, int] = field(default_factory=dict)  # key path -> line of the key (or list item)
    tokens: dict[Path, str] = field(default_factory=dict)  # key path -> source text of a plain scalar
    duplicates: list[DuplicateKey] = field(default_factory=list)


class RecipeLoader(yaml.SafeLoader):
    """A SafeLoader that also records duplicate keys (by mapping node) for `load_yaml`."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self.duplicate_lines: dict[int, list[tuple[Any, int, int]]] = {}  # id(node) -> (key, first, again)

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict:
        self._record_duplicate_keys(node)
        return super().construct_mapping(node, deep=deep)

    def _record_duplicate_keys(self, node: MappingNode) -> None:
        # Runs before SafeConstructor flattens `<<` merges, so only keys written in this
        # mapping count: overriding a merged-in key is legitimate YAML.
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG or not isinstance(key_node, ScalarNode):
                continue
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in first_line:
                self.duplicate_lines.setdefault(id(node), []).append((key, first_line[key], line))
            else:
                first_line[key] = line


def _reject_tag(loader: RecipeLoader, node: Node) -> None:
    raise yaml.constructor.ConstructorError(
        None,
        None,
        f"tag {node.tag} is not allowed: a recipe is plain data (mappings, lists, strings, numbers, booleans)",
        node.start_mark,
    )


RecipeLoader.add_implicit_resolver(_FLOAT_TAG, _FLOAT_WITHOUT_DOT, list("-+0123456789."))
# The catch-all constructor: every tag without a SafeLoader constructor lands here.
RecipeLoader.add_constructor(None, _reject_tag)


class RecipeDumper(yaml.SafeDumper):
    """A SafeDumper that quotes strings RecipeLoader would read as floats (e.g. "1e5")."""

    def ignore_aliases(self, data: Any) -> bool:
        return True  # a resolved recipe is read by people: no &anchors


RecipeDumper.add_implicit_resolver(_FLOAT_TAG, _FLOAT_WITHOUT_DOT, list("-+0123456789."))


def load_yaml(text: str) -> LoadedYaml:
    """Parse one YAML document safely; raise YamlError (with a line) if it cannot be read.

    An empty document loads as None. Duplicate keys do not raise: they are returned in
    `duplicates` (the last value wins in `data`) so they can be reported with the rest.
    """
    loader = RecipeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return LoadedYaml(data=None)
        data = loader.construct_document(root)
        loaded = LoadedYaml(data=data, root_line=root.start_mark.line + 1)
        _record_sources(loader, root, (), loaded, visited=set())
        return loaded
    except yaml.MarkedYAMLError as err:
        raise _yaml_error(err) from None
    except yaml.YAMLError as err:  # unmarked: rare (e.g. a reader error without position)
        raise YamlError(1, str(err)) from None
    finally:
        loader.dispose()


def _yaml_error(err: yaml.MarkedYAMLError) -> YamlError:
    mark = err.problem_mark or err.context_mark
    line = mark.line + 1 if mark is not None else 1
    message = err.problem or "cannot parse"
    if err.context and err.context_mark is not None and err.context_mark is not mark:
        context = f"{err.context} at line {err.context_mark.line + 1}"
        # PyYAML splits one sentence: context "expected a single document", problem "but found another"
        message = f"{context}, {message}" if message.startswith("but ") else f"{message} ({context})"
    if "\\t" in message or "\t" in message:
        message += "; indent with spaces, not tabs"
    if isinstance(err, yaml.constructor.ConstructorError):  # well-formed YAML, but not plain data
        return YamlError(line, message)
    return YamlError(line, f"YAML syntax: {message}")


def _record_sources(loader: RecipeLoader, node: Node, path: Path, loaded: LoadedYaml, visited: set[int]) -> None:
    """Walk the node tree next to the data, filling `loaded.lines`, `tokens` and `duplicates`.

    Aliases point at nodes already seen; each node is walked once, so `&a [*b, *b, ...]`
    chains (billion laughs) cost linear time here.
    """
    if isinstance(node, ScalarNode):
        if node.style is None:  # plain, not quoted: the token YAML resolved to a bool/number/null
            loaded.tokens[path] = node.value
        return
    if id(node) in visited:
        return
    visited.add(id(node))
    if isinstance(node, SequenceNode):
        for index, item in enumerate(node.value):
            loaded.lines[(*path, index)] = item.start_mark.line + 1
            _record_sources(loader, item, (*path, index), loaded, visited)
    elif isinstance(node, MappingNode):
        for key, first, again in loader.duplicate_lines.get(id(node), []):
            loaded.duplicates.append(DuplicateKey((*path, key), first, again))
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                continue  # SafeLoader already refused unhashable (non-scalar) keys
            key = loader.construct_object(key_node)
            loaded.lines[(*path, key)] = key_node.start_mark.line + 1
            _record_sources(loader, value_node, (*path, key), loaded, visited)


def dump_yaml(data: Any) -> str:
    """Block-style YAML in the given key order that `load_yaml` reads back to equal data."""
    return yaml.dump(data, Dumper=RecipeDumper, sort_keys=False, default_flow_style=False, allow_unicode=True)
