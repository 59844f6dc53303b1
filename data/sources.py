"""Which files make the corpus, and how they group into weighted sources (``--data_mix``).

Without a mixture every file under data_dir is one source named ``all``. With one, each source is a folder or
glob under data_dir with a weight: a number, or ``"auto"`` with a top-level ``"temperature"`` T, which gives
weight proportional to (tokens of the source)^(1/T) (T = 1: as the data lies; larger T: flatter).

    {"temperature": 3,
     "sources": [{"name": "zh_web", "path": "zh/**", "weight": 0.6},
                 {"name": "en_books", "path": "en/**", "weight": "auto"}]}
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np

SOURCE_KEYS = {"name", "path", "weight"}
MIX_KEYS = {"sources", "temperature"}


def check_engine_args(data_dir: Union[str, Path], seed, **positive) -> Path:
    """The checks both engines make on construction; returns data_dir as a Path. `positive`: sizes that must be
    positive integers, by their argument names (named in the error)."""
    for name, value in positive.items():
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise FileNotFoundError(f"data_dir not found: {data_dir}")
    if not data_dir.is_dir():
        raise NotADirectoryError(f"data_dir is not a folder: {data_dir}")
    return data_dir


def list_data_files(data_dir: Union[str, Path], exclude: Sequence[Union[str, Path]] = ()) -> List[Path]:
    """Regular files under data_dir, recursively, sorted by relative path; hidden names and `exclude` skipped."""
    root = Path(data_dir)
    excluded = {Path(p).resolve() for p in exclude}
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place so os.walk does not descend into hidden or excluded folders (the cache lives in one).
        dirnames[:] = [d for d in dirnames
                       if not d.startswith(".") and (Path(dirpath) / d).resolve() not in excluded]
        found.extend(Path(dirpath) / f for f in filenames if not f.startswith("."))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def files_for_rank(files: Sequence[Path], world_size: int, rank: int) -> List[Path]:
    """The reference's assignment: file i goes to rank i % world_size."""
    return [f for i, f in enumerate(files) if i % world_size == rank]


@dataclass
class Source:
    name: str
    pattern: str  # as written in the mixture file ("" for the whole data_dir)
    weight: Union[float, str]  # a number, or "auto" until resolve_weights() replaces it
    files: List[Path] = field(default_factory=list)


def _match(pattern: str, data_dir: Path, files: List[Path]) -> List[Path]:
    """Files under data_dir that `pattern` names: a folder (all files below it) or a glob on relative paths."""
    rel = {p.relative_to(data_dir).as_posix(): p for p in files}
    if (data_dir / pattern).is_dir():
        prefix = pattern.rstrip("/") + "/"
        return [p for r, p in rel.items() if r.startswith(prefix)]
    chosen = {p.resolve() for p in data_dir.glob(pattern) if p.is_file()}
    return [p for p in files if p.resolve() in chosen]


def read_mixture(path: Union[str, Path], data_dir: Path, files: List[Path]) -> tuple:
    """(sources, temperature) from a --data_mix JSON file; every problem is a ValueError naming the file."""
    where = f"--data_mix {path}"
    try:
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: no such file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON: {e}") from e
    if not isinstance(spec, dict) or not isinstance(spec.get("sources"), list) or not spec["sources"]:
        raise ValueError(f'{where}: expected {{"sources": [{{"name": ..., "path": ..., "weight": ...}}, ...]}}')
    unknown = set(spec) - MIX_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)} (allowed: {sorted(MIX_KEYS)})")
    temperature = spec.get("temperature")
    sources, seen = [], set()
    for i, s in enumerate(spec["sources"]):
        if not isinstance(s, dict):
            raise ValueError(f"{where}: source {i} is not an object")
        unknown = set(s) - SOURCE_KEYS
        if unknown:
            raise ValueError(f"{where}: source {i} has unknown key(s) {sorted(unknown)} "
                             f"(allowed: {sorted(SOURCE_KEYS)})")
        missing = SOURCE_KEYS - set(s)
        if missing:
            raise ValueError(f"{where}: source {i} lacks {sorted(missing)}")
        name, pattern, weight = str(s["name"]), str(s["path"]), s["weight"]
        if name in seen:
            raise ValueError(f"{where}: source name {name!r} is used twice")
        seen.add(name)
        if Path(pattern).is_absolute() or ".." in Path(pattern).parts:
            raise ValueError(f"{where}: source {name!r} path {pattern!r} must stay inside data_dir {data_dir}")
        if weight == "auto":
            if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature <= 0:
                raise ValueError(f'{where}: source {name!r} has weight "auto", which needs a top-level '
                                 f'"temperature" > 0 (got {temperature!r})')
        elif (not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight)
              or weight < 0):
            raise ValueError(f'{where}: source {name!r} weight must be a number >= 0 or "auto", got {weight!r}')
        glob_chars = any(c in pattern for c in "*?[")
        if not glob_chars and not (data_dir / pattern).exists():
            raise ValueError(f"{where}: source {name!r} names {data_dir / pattern}, which does not exist")
        matched = _match(pattern, data_dir, files)
        if not matched:
            raise ValueError(f"{where}: source {name!r} ({pattern!r}) matches no data file under {data_dir} "
                             "(hidden files and the cache folder are ignored)")
        sources.append(Source(name, pattern, weight, matched))
    owners = {}
    for s in sources:
        for p in s.files:
            if p in owners:
                raise ValueError(f"{where}: {p} belongs to both {owners[p]!r} and {s.name!r}; sources must not overlap")
            owners[p] = s.name
    numeric = [s.weight for s in sources if s.weight != "auto"]
    if len(numeric) == len(sources) and sum(numeric) <= 0:
        raise ValueError(f"{where}: the weights sum to {sum(numeric)}; at least one must be positive")
    return sources, temperature


def resolve_weights(sources: List[Source], tokens: Sequence[int], temperature: Optional[float]) -> List[float]:
    """Normalized weights. "auto" sources share what the numeric ones leave (1 - their sum, or all of it when
    every source is auto) in proportion to tokens^(1/T)."""
    fixed = [s.weight for s in sources if s.weight != "auto"]
    auto = [i for i, s in enumerate(sources) if s.weight == "auto"]
    if not auto:
        total = float(sum(fixed))
        return [float(s.weight) / total for s in sources]
    if sum(fixed) >= 1:
        raise ValueError(f'the numeric weights sum to {sum(fixed)}, leaving nothing for the "auto" sources '
                         f"{[sources[i].name for i in auto]} (numeric weights are shares of 1 when mixed with auto)")
    scores = {i: float(tokens[i]) ** (1.0 / float(temperature)) for i in auto}
    left, total = 1.0 - sum(fixed), sum(scores.values())
    return [left * scores[i] / total if i in scores else float(s.weight) for i, s in enumerate(sources)]
