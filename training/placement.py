"""Where an export puts a model's new graph when the repository already serves that model.

- The same graph, config and class names as the served version's (the same weights exported again, served
  the same way): the served version is kept, not written again, so Triton reloads nothing and the version
  number does not move. The same graph served another way (`--flavor`, `--instances`, renamed classes): a new
  current version, since its answers are the served version's.
- A student a rollout can judge (`student_kd`, `student_plain`, `student_pruned` and their INT8 siblings): the
  new graph becomes a *candidate* beside the served version (`kdcontract.versions.on_trial`), exactly as
  `training redistill` makes one, after the same offline gate (`training.offline_gate`: refused when surely
  worse than the served version on the held-out split). The served version keeps every request until a
  rollout's gates promote the candidate, or an operator does (`python -m training versions promote`, or
  `export --promote`): nothing reaches 100% of a student's traffic without a decision.
- Anything else (the teacher, the ensemble's variants, a model the repository does not serve yet): the new
  graph is the new current version, as a first export writes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from kdcontract.manifest import ModelEntry, file_sha256
from kdcontract.names import INT8_SOURCES, INT8_SUFFIX, STUDENT_KD, STUDENT_PLAIN, STUDENT_PRUNED, int8_name
from kdcontract.versions import check_no_trial, on_trial

ON_TRIAL = frozenset({STUDENT_KD, STUDENT_PLAIN, STUDENT_PRUNED, *(int8_name(n) for n in INT8_SOURCES)})

# write(also_loaded) writes the graph as a new version whose config also loads `also_loaded`, and returns it.
WriteVersion = Callable[[tuple[int, ...]], ModelEntry]
# judge() is the offline gate a candidate passes before it is written: its figures, or a UserError (refused).
JudgeCandidate = Callable[[], dict]


@dataclass(frozen=True)
class NewVersion:
    """What an export would serve for a model: its graph, its config (before the version policy) and classes."""

    graph: Path
    config: pb.ModelConfig
    class_names: list[str]


def _same_graph(served: ModelEntry, new: NewVersion) -> bool:
    return served.files.get(f"{served.name}/{served.version}/model.onnx") == file_sha256(new.graph)


def _served_the_same_way(repo: Path, served: ModelEntry, new: NewVersion) -> bool:
    """The same config but for the versions it loads, and the same classes."""
    config_path = repo / served.name / "config.pbtxt"
    if served.class_names != new.class_names or not config_path.is_file():
        return False
    config, wanted = text_format.Parse(config_path.read_text(), pb.ModelConfig()), pb.ModelConfig()
    wanted.CopyFrom(new.config)
    for message in (config, wanted):
        message.ClearField("version_policy")
    return config == wanted


def place(
    repo: Path,
    name: str,
    served: ModelEntry | None,
    new: NewVersion,
    write: WriteVersion,
    promote: bool,
    judge: JudgeCandidate | None = None,
) -> ModelEntry:
    """The manifest entry of `name` after exporting `new`: the served one kept, a candidate beside it (once
    `judge`, its offline gate, passed it), or a new current version (see the module's docstring)."""
    if served is not None and _same_graph(served, new):
        if _served_the_same_way(repo, served, new):
            print(
                f"[export] {name}: served version {served.version} is this graph, served the same way: kept", flush=True
            )
            return served
        check_no_trial(served)  # the new config would load the new version alone, unloading the one on trial
        written = write(())  # the same answers, served another way: nothing for a rollout to judge
        print(f"[export] {name}: the served graph, served another way: version {written.version}", flush=True)
        return written
    if served is None or name not in ON_TRIAL:
        return write(())
    check_no_trial(served)  # one candidate at a time, promoted or not: a rollout may be judging the one on trial
    if promote:
        written = write(())
        print(f"[export] {name}: version {written.version} current at once (--promote), no trial", flush=True)
        return written
    gate = judge() if judge is not None else None
    written = write((served.version,))
    base = name.removesuffix(INT8_SUFFIX)
    decided = (
        f"a rollout promotes it ({name}@{written.version}; by hand: python -m training versions promote "
        f"{name}@{written.version}, or export --promote)"
        if base == name
        else f"{base}'s candidate is promoted or rejected, with which it goes"
    )
    print(
        f"[export] {name}: version {written.version} written as a candidate beside version {served.version}, which "
        f"answers every request until {decided}",
        flush=True,
    )
    return on_trial(served, written, gate)
