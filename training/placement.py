"""Where an export puts a model's new graph when the repository already serves that model.

- The same graph as the served version's (the same weights exported again): the served version is kept, not
  written again, so Triton reloads nothing and the version number does not move.
- A student a rollout can judge (`student_kd`, `student_plain`, `student_pruned` and their INT8 siblings): the
  new graph becomes a *candidate* beside the served version (`kdcontract.versions.on_trial`), exactly as
  `training redistill` makes one. The served version keeps every request until a rollout's gates promote the
  candidate, or an operator does (`python -m training versions promote`, or `export --promote`): nothing
  reaches 100% of a student's traffic without a decision.
- Anything else (the teacher, the ensemble's variants, a model the repository does not serve yet): the new
  graph is the new current version, as a first export writes it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kdcontract.manifest import ModelEntry
from kdcontract.names import INT8_SOURCES, INT8_SUFFIX, STUDENT_KD, STUDENT_PLAIN, STUDENT_PRUNED, int8_name
from kdcontract.versions import check_no_trial, on_trial
from training.triton_repo import sha256

ON_TRIAL = frozenset({STUDENT_KD, STUDENT_PLAIN, STUDENT_PRUNED, *(int8_name(n) for n in INT8_SOURCES)})

# write(also_loaded) writes the graph as a new version whose config also loads `also_loaded`, and returns it.
WriteVersion = Callable[[tuple[int, ...]], ModelEntry]


def place(name: str, served: ModelEntry | None, graph: Path, write: WriteVersion, promote: bool) -> ModelEntry:
    """The manifest entry of `name` after exporting `graph`: the served one kept, a candidate beside it, or a
    new current version (see the module's docstring)."""
    if served is not None and served.files.get(f"{name}/{served.version}/model.onnx") == sha256(graph):
        print(f"[export] {name}: the same graph as served version {served.version}: kept", flush=True)
        return served
    if served is None or name not in ON_TRIAL:
        return write(())
    check_no_trial(served)  # one candidate at a time, promoted or not: a rollout may be judging the one on trial
    if promote:
        new = write(())
        print(f"[export] {name}: version {new.version} current at once (--promote), no trial", flush=True)
        return new
    new = write((served.version,))
    base = name.removesuffix(INT8_SUFFIX)
    decided = (
        f"a rollout promotes it ({name}@{new.version}; by hand: python -m training versions promote "
        f"{name}@{new.version}, or export --promote)"
        if base == name
        else f"{base}@{new.version} is promoted or rejected, with which it goes"
    )
    print(
        f"[export] {name}: version {new.version} written as a candidate beside version {served.version}, which "
        f"answers every request until {decided}",
        flush=True,
    )
    return on_trial(served, new)
