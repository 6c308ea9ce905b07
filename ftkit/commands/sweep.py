"""`ftkit sweep RECIPE --grid KEY=V1,V2 ...`: every combination of the grid, one run after another, then compare.

    parse_grid(texts) → points(grid) → plan_sweep(...) (every point validated, its run dir checked)
    → run_point(...) each (a child `ftkit train`) → compare over the completed runs (files in --out)

Each point is a normal run directory under --out, named by its overrides (`lr=1e-4,method.name=lora`:
`train.` is left out of the names, other sections kept). A point whose run has completed is
skipped; one that stopped with a complete checkpoint is resumed (`ftkit train --resume`); one that
stopped before its first checkpoint starts again. Each point runs in its own process, so a point
that crashes (out of memory, a non-finite loss) is reported and the sweep goes on; Ctrl-C stops
the running point cleanly (it saves a checkpoint) and the sweep, so running it again resumes there.

Grid values are read like `--set` values (the same YAML reader and the same recipe validation),
so a grid key or value the recipe would refuse is an exit-2 error before anything runs or is written.
"""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ftkit.commands.compare import Comparison, compare, load_run, write_outputs
from ftkit.errors import ArgumentError, FtkitError, Interrupted, RecipeError, RunDirError
from ftkit.io import messages
from ftkit.recipe import Recipe, load_recipe
from ftkit.recipe.overrides import parse_override
from ftkit.rundir import complete_checkpoints, has_completed, is_run_dir

_EXAMPLE = "--grid train.lr=1e-4,3e-4"
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")
_STOPPED = (130, 143)  # the child stopped on SIGINT / SIGTERM after saving a checkpoint


@dataclass
class GridAxis:
    """One `--grid key=v1,v2`: the key and the values' texts, as given."""

    key: str
    values: list[str]


@dataclass
class Point:
    """One combination: its overrides (`key=value` texts) and its run directory's name."""

    overrides: list[str]
    name: str
    run_dir: Path = field(default=Path())
    action: str = "train"  # train | resume | restart | skip
    status: str = "pending"  # pending | completed | skipped | failed | stopped
    wall_s: float = 0.0
    error: str = ""
    exit_code: int = 0


def split_values(text: str) -> list[str]:
    """`1e-4,3e-4` → ['1e-4', '3e-4']; commas inside [...], {...} or quotes do not split
    (`[q_proj,v_proj],all-linear` is two values)."""
    values, depth, quote, current = [], 0, "", []
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    values.append("".join(current).strip())
    return values


def parse_grid(texts: list[str]) -> list[GridAxis]:
    """Each `--grid key.path=v1,v2,...` as a GridAxis; ArgumentError naming the one that is malformed."""
    axes: list[GridAxis] = []
    for text in texts:
        key, sep, rest = text.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ArgumentError(f"--grid {text}: expected key.path=value1,value2,..., e.g. {_EXAMPLE}")
        if not all(key.split(".")):
            raise ArgumentError(f"--grid {text}: '{key}' is not a key path; write dotted keys, e.g. {_EXAMPLE}")
        values = split_values(rest)
        if any(v == "" for v in values):
            raise ArgumentError(f"--grid {text}: an empty value; separate values with single commas, e.g. {_EXAMPLE}")
        if len(set(values)) != len(values):
            raise ArgumentError(f"--grid {text}: a value is given twice")
        if any(axis.key == key for axis in axes):
            raise ArgumentError(f"--grid {key}: the key is given twice; put all its values in one --grid")
        for value in values:
            try:
                parse_override(f"{key}={value}")
            except ValueError as err:
                raise ArgumentError(f"--grid {key}={value}: {err}") from None
        axes.append(GridAxis(key, values))
    if not axes:
        raise ArgumentError(f"--grid: give at least one, e.g. {_EXAMPLE}")
    return axes


def point_name(overrides: list[str]) -> str:
    """The run directory's name for a point: `lr=1e-4,method.name=lora` (train. dropped, unsafe
    characters such as / and spaces as _)."""
    parts = [text.removeprefix("train.") for text in overrides]
    return _UNSAFE.sub("_", ",".join(parts))


def grid_points(axes: list[GridAxis]) -> list[Point]:
    """Every combination, the first --grid varying slowest; ArgumentError if two names collide."""
    points = []
    for values in itertools.product(*(axis.values for axis in axes)):
        overrides = [f"{axis.key}={value}" for axis, value in zip(axes, values, strict=True)]
        points.append(Point(overrides, point_name(overrides)))
    names = [p.name for p in points]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ArgumentError(
                f"--grid: two points would share the run directory {name!r} ({points[names.index(name)].overrides} "
                f"and {points[i].overrides}); use values that differ in letters or digits"
            )
    return points


def validate_points(recipe: Path, sets: list[str], points: list[Point]) -> list[Recipe]:
    """Each point's recipe, validated as `--set` would be; RecipeError with every problem (each once,
    grid values cited as `--grid`) before anything runs."""
    grid_keys = {o.partition("=")[0].strip() for p in points for o in p.overrides}
    for text in sets:
        key = text.partition("=")[0].strip()
        if key in grid_keys:
            raise ArgumentError(f"--set {text}: {key} is also a --grid key; give it in one of them")
    recipes, problems = [], []
    for point in points:
        try:
            recipes.append(load_recipe(recipe, [*sets, *point.overrides]))
        except RecipeError as err:
            for line in err.problems:
                for text in point.overrides:
                    line = line.replace(f"--set {text}:", f"--grid {text}:")
                problems.append(line)
    if problems:  # one line per problem: an unknown key is reported once, not once per value
        unique = {line.partition(": ")[2] or line: line for line in reversed(problems)}
        raise RecipeError(list(dict.fromkeys(line for line in problems if line in unique.values())))
    if recipes[0].data.val is None and recipes[0].data.val_fraction == 0:
        raise ArgumentError(
            f"{recipe}: data.val or data.val_fraction: a sweep compares its runs on val_loss; give it a validation set"
        )
    return recipes


def plan_sweep(recipe: Path, sets: list[str], grid: list[str], out: Path) -> tuple[list[Point], list[Recipe]]:
    """Parse and validate the whole grid, and decide per point: train, resume, restart or skip.
    Refuses (exit 2, nothing written) a point directory that holds something else than an ftkit run,
    or a run made from another recipe."""
    points = grid_points(parse_grid(grid))
    recipes = validate_points(recipe, sets, points)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out: {out} is a file; give a directory")
    for point, resolved in zip(points, recipes, strict=True):
        point.run_dir = out / point.name
        resolved.output_dir = str(point.run_dir)
        point.action = _action(point.run_dir, resolved)
    return points, recipes


def _action(run_dir: Path, recipe: Recipe) -> str:
    if not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir())):
        return "train"
    if not is_run_dir(run_dir):
        raise RunDirError(
            f"--out: {run_dir} exists and is no ftkit run; move it away or choose another --out (the sweep "
            "does not replace what it did not make)"
        )
    changed = _changed_keys(load_recipe(run_dir / "recipe.yaml"), recipe)
    if changed:
        raise RunDirError(
            f"--out: {run_dir} was trained from another recipe ({', '.join(changed[:5])} differ); "
            "choose another --out for the changed sweep"
        )
    if has_completed(run_dir):
        return "skip"
    return "resume" if complete_checkpoints(run_dir) else "restart"


def _changed_keys(old: Recipe, new: Recipe) -> list[str]:
    before, after = _leaves(old.model_dump(mode="json")), _leaves(new.model_dump(mode="json"))
    keys = [k for k in dict.fromkeys([*before, *after]) if k != "output_dir"]
    return [k for k in keys if before.get(k) != after.get(k)]


def _leaves(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out |= _leaves(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def train_command(recipe: Path, sets: list[str], point: Point) -> list[str]:
    """The child process: `python -m ftkit train RECIPE --set ... --output-dir DIR [--resume | --overwrite]`."""
    command = [sys.executable, "-m", "ftkit", "train", str(recipe)]
    for text in [*sets, *point.overrides]:
        command += ["--set", text]
    command += ["--output-dir", str(point.run_dir)]
    command += {"resume": ["--resume"], "restart": ["--overwrite"]}.get(point.action, [])
    return command


def run_point(recipe: Path, sets: list[str], point: Point) -> None:
    """Train one point in a child process, its lines passed on to stderr; sets point.status."""
    log = messages()
    started = time.perf_counter()
    child = subprocess.Popen(
        train_command(recipe, sets, point),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    last = ""
    try:
        for line in child.stderr:
            log.write(f"  {line}")
            log.flush()
            last = line.strip() or last
        code = child.wait()
    except KeyboardInterrupt:  # the child got the same SIGINT: let it save its checkpoint
        code = child.wait()
        point.status, point.wall_s, point.exit_code = "stopped", time.perf_counter() - started, 130
        raise
    point.wall_s, point.exit_code = time.perf_counter() - started, code
    if code == 0:
        point.status = "completed"
    elif code in _STOPPED:
        point.status, point.error = "stopped", last
    else:
        point.status, point.error = "failed", f"exit {code}: {last}"


def run_sweep(recipe: Path, sets: list[str], grid: list[str], out: Path, with_html: bool = False) -> dict:
    """`ftkit sweep`: validate everything, run the points in order, compare the completed runs in --out.

    Returns {"points": [...], "comparison": Comparison | None}; raises Interrupted when a point was
    stopped by a signal (run the same command again to resume), FtkitError when some point failed
    (after the others ran and were compared)."""
    points, _ = plan_sweep(recipe, sets, grid, out)
    out.mkdir(parents=True, exist_ok=True)
    log = messages()
    for index, point in enumerate(points, start=1):
        where = f"[{index}/{len(points)}] {point.name}"
        if point.action == "skip":
            point.status = "skipped"
            log.write(f"{where}: completed earlier, skipped\n")
            continue
        log.write(f"{where}: {_doing[point.action]} → {point.run_dir}\n")
        run_point(recipe, sets, point)
        if point.status == "stopped":
            raise Interrupted(
                f"sweep stopped at {point.name} (it saved a checkpoint); run the same command to resume it",
                point.exit_code,
            )
        if point.status == "failed":
            log.write(f"{where}: failed ({point.error}); going on with the next point\n")
    comparison = compare_points(points, out, with_html)
    failed = [p for p in points if p.status == "failed"]
    if failed:
        raise FtkitError(
            f"sweep: {len(failed)} of {len(points)} points failed ({', '.join(p.name for p in failed)}); "
            f"their logs are in each run's logs/; run the same command to retry them"
        )
    return {"points": points, "comparison": comparison}


_doing = {"train": "training", "resume": "resuming from its newest checkpoint", "restart": "starting again"}


def compare_points(points: list[Point], out: Path, with_html: bool) -> Comparison | None:
    """compare.md / .png / .json (and .html) in --out over the runs that completed; None under two."""
    done = [p for p in points if p.status in ("completed", "skipped")]
    if len(done) < 2:
        messages().write(f"sweep: {len(done)} completed run(s); nothing to compare\n")
        return None
    runs = [load_run(p.run_dir, p.name) for p in done]
    comparison = compare(runs)
    write_outputs(out, comparison, runs, with_html)
    messages().write("".join(f"{line}\n" for line in comparison.verdict) + f"wrote {out / 'compare.md'}\n")
    return comparison
