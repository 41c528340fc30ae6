"""`python -m loadtest loop` (`make loop`): continuous distillation, gated end to end, as one command.

On the demo's digits (`make models`: its teacher and KD student), a stack of its own in `--work`: Triton
polling a scratch copy of the repository's student and teacher, two gateway replicas with API keys that
share one experiment file, answer store and capture, and the rollout controller (`python -m gateway
rollout --repo`). Locust drives every phase; each request is sent under an API key and labelled by the
same key (`LoopUser`), to the other replica.

1. before: upright digits in random client forms; the served student's drift test stays quiet.
2. a new style arrives: half the traffic is italic (digits slanted as a right-handed writer slants them, a
   style neither the teacher nor the student saw: both misread it), labelled by an honest key. The loop
   waits for the drift test to flag the student's version, and keeps the traffic up until enough of the
   new style is captured with labels. With `--poison`, a second key sends 30% of the traffic and labels
   every request of its own as one class (POISON_CLASS).
3. re-distil from the capture (`python -m training redistill`): the label keys judged, the offline gate
   against the served version on the held-out test split, the candidate exported beside the current
   version (`student_kd@N`) when it passes.
4. the candidate and the current version compared by name on held-out digits, upright and italic.
5. the gated rollout: the current version the control, the candidate the candidate, every request
   shadowed, steps of traffic judged on the labels and latency; the controller promotes the candidate in the
   repository (current := candidate) or rolls it back and unloads it. A candidate still pending at the
   deadline is rejected by the loop (`training versions reject`): it was not shown to be better.

With `--poison`, the hostile key is flagged (its labels dropped) and that candidate's offline figures are
reported; then a candidate trained on every key's labels (a poisoner past the key check) goes through the
same gates, which must refuse it offline or roll it back online, the current version answering at least
90% of the name's traffic throughout.

Writes results.json and results.md (`benchmarks/loop/`, `benchmarks/loop-poison/`).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from gateway.process import GatewayProcess, free_port
from gateway.triton.server import EmbeddedTriton, TritonPorts
from kdcontract.client_forms import FILTERS, ClientForm, render_image
from kdcontract.digits import digits_gray, held_out_indices, split_indices
from kdcontract.errors import UserError
from kdcontract.machine import cpu_description
from kdcontract.manifest import read_manifest
from kdcontract.names import STUDENT_KD, versioned
from kdcontract.tables import markdown_table, percent, write_results
from loadtest.clients.measure import metric_value
from loadtest.clients.run import run_load
from loadtest.stacks.rollout import locust_totals, request_counts, scratch_repository, start_experiment_file

SLANT = 0.45  # the italic style (x shifted by SLANT per row); the demo's student and teacher read ~70% of it
KEYS = {"honest": "loop-honest-key-0001", "hostile": "loop-hostile-key-0002"}
HOSTILE_SHARE = 0.3
POISON_CLASS = "1"  # the hostile key labels every image it sends as this class
# People label some of their answers (on the page, the ones worth correcting); a poisoner labels all of its own.
HONEST_LABEL_SHARE = 0.3
POLL_S = 0.5  # the replicas' experiment and manifest polls
USERS = 4
GATES = {"latency": {"quantile": 0.5, "max_ratio": 2.0}, "max_top1_drop": 0.0}
STEPS = [0.1, 0.5, 1.0]


@dataclass(frozen=True)
class LoopPlan:
    before_s: int = 20  # upright traffic only
    after_drift_s: int = 40  # the new style's traffic kept up after the drift flag, for the capture
    new_style_max_s: int = 120  # the drift flag must come within this
    rollout_max_s: int = 240  # the rollout must end within this (a pending candidate is then rejected)
    min_samples: int = 300
    min_duration_s: float = 10.0
    redistill_epochs: int = 3
    poison: bool = False


def italic(digit: np.ndarray, size: int = 64) -> bytes:
    """A digit written slanted, as a 64 px PNG (light ink on black, as the gateway's framing expects)."""
    upright = render_image(digit, ClientForm(size=size, resample="bilinear"))
    shift = -SLANT * size / 2
    slanted = upright.transform(
        (size, size), Image.Transform.AFFINE, (1, SLANT, shift, 0, 1, 0), Image.Resampling.BILINEAR
    )
    out = io.BytesIO()
    slanted.save(out, format="PNG")
    return out.getvalue()


def upright(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """A digit as a random client sends it (size, filter, polarity), as PNG."""
    size = int(rng.choice([8, 16, 32, 64, 128]))
    form = ClientForm(size=size, resample=str(rng.choice(list(FILTERS))), dark_on_light=bool(rng.random() < 0.5))
    out = io.BytesIO()
    render_image(digit, form).save(out, format="PNG")
    return out.getvalue()


def traffic_folder(folder: Path, indices: np.ndarray, italic_share: float, seed: int) -> Path:
    """PNGs and labels.json for the Locust users: each digit upright (a random client form) or italic."""
    rng = np.random.default_rng(seed)
    digits, labels = digits_gray()
    folder.mkdir(parents=True, exist_ok=True)
    mapping = {}
    for index in indices:
        style = "italic" if rng.random() < italic_share else "upright"
        body = italic(digits[index]) if style == "italic" else upright(digits[index], rng)
        name = f"{style}-{int(index):04d}.png"
        (folder / name).write_bytes(body)
        mapping[name] = str(labels[index])
    (folder / "labels.json").write_text(json.dumps(mapping))
    return folder


def keys_file(path: Path) -> Path:
    keys = [{"id": key_id, "sha256": hashlib.sha256(key.encode()).hexdigest()} for key_id, key in KEYS.items()]
    path.write_text(json.dumps(keys))
    return path


def loop_keys(poison: bool) -> str:
    """LoopUser's clients: the honest key alone, or beside a hostile one sending HOSTILE_SHARE of the traffic."""
    honest = {"share": 1 - HOSTILE_SHARE if poison else 1.0, "label_share": HONEST_LABEL_SHARE}
    keys = [{"key": KEYS["honest"], **honest}]
    if poison:
        keys.append({"key": KEYS["hostile"], "share": HOSTILE_SHARE, "label_share": 1.0, "poison_class": POISON_CLASS})
    return json.dumps(keys)


def one_arm(model: str) -> dict:
    return {"control": model, "candidate": model, "weights": {model: 1.0}}


def rollout_experiment(candidate: str, plan: LoopPlan) -> dict:
    return {
        "control": STUDENT_KD,
        "candidate": candidate,
        "weights": {candidate: 0.0, STUDENT_KD: 1.0},
        "shadow_fraction": 1.0,
        "gates": GATES,
        "rollout": {
            "enabled": True,
            "steps": STEPS,
            "min_samples": plan.min_samples,
            "min_duration_s": plan.min_duration_s,
        },
    }


class Stack:
    """Triton and two gateway replicas on a scratch repository, with keys, one experiment file, one answer
    store and one capture."""

    def __init__(self, repo: Path, work: Path) -> None:
        self.work = work
        shutil.rmtree(work, ignore_errors=True)
        self.repo = scratch_repository(repo, work / "repo")
        self.experiment_file = work / "experiment.json"
        self.capture = work / "capture"
        start_experiment_file(self.experiment_file, one_arm(STUDENT_KD))
        self.env = {
            "KDSERVE_API_KEYS_FILE": str(keys_file(work / "keys.json")),
            "KDSERVE_EXPERIMENT_FILE": str(self.experiment_file),
            "KDSERVE_EXPERIMENT_POLL_S": str(POLL_S),
            "KDSERVE_MANIFEST_POLL_S": str(POLL_S),
            "KDSERVE_ANSWERS_DIR": str(work / "answers"),
            "KDSERVE_CAPTURE_FRACTION": "1.0",
            "KDSERVE_CAPTURE_DIR": str(self.capture),
            "KDSERVE_CAPTURE_SEGMENT_S": "2",
            "KDSERVE_DRIFT_INTERVAL_S": "1",
        }
        self.auth = {"Authorization": f"Bearer {KEYS['honest']}"}

    def __enter__(self) -> Stack:
        ports = TritonPorts(free_port(), free_port(), free_port())
        poll = ["--model-control-mode=poll", "--repository-poll-secs=1"]
        self.triton = EmbeddedTriton(self.repo, ports, log_file=self.work / "triton.log", extra_args=poll)
        self.triton.start()
        self.replicas = [
            GatewayProcess(self.repo, self.triton.http_url, env=self.env, ready_path="/readyz") for _ in range(2)
        ]
        self.urls = [g.url for g in self.replicas]
        return self

    def __exit__(self, *exc) -> None:
        for gateway in self.replicas:
            gateway.stop()
        self.triton.stop()

    def get(self, url: str, path: str) -> dict:
        resp = httpx.get(f"{url}{path}", headers=self.auth, timeout=10)
        resp.raise_for_status()
        return resp.json()

    def drift(self, version: int) -> list[dict]:
        """Each replica's drift verdict of the student's `version` (empty before any answer)."""
        name = versioned(STUDENT_KD, version)
        return [self.get(url, "/v1/drift")["versions"].get(name, {}) for url in self.urls]

    def load(self, phase: str, images: Path, poison: bool, seconds: int, stop_when=None) -> dict:
        """Locust against the first replica, labels to the second, for `seconds` or until `stop_when()`."""
        return run_load(
            self.urls[0], "loop", USERS, f"{seconds}s", self.work / f"locust-{phase}", None,
            max_fail_ratio=1.0, feedback_url=self.urls[-1], stop_when=stop_when, api_key=KEYS["honest"],
            images=images, env={"KDSERVE_LOOP_KEYS": loop_keys(poison)},
        )  # fmt: skip

    def metrics(self) -> list[str]:
        return [httpx.get(f"{url}/metrics", timeout=10).text for url in self.urls]


def pools(split) -> tuple[np.ndarray, np.ndarray]:
    """(traffic, held-out): the digits outside the test split, which clients send; the test split, which no
    model trained on and no client sends (the offline gate's and the comparison's images)."""
    labels = digits_gray()[1]
    train_idx, val_idx, _ = split_indices(labels, split, with_test=True)
    return np.concatenate([train_idx, val_idx]), held_out_indices(split)


def top1(stack: Stack, model: str, bodies: list[bytes], labels: np.ndarray) -> float:
    right = 0
    with httpx.Client(base_url=stack.urls[0], headers=stack.auth, timeout=30) as client:
        for start in range(0, len(bodies), 32):
            files = [("images", (f"{i}.png", b, "image/png")) for i, b in enumerate(bodies[start : start + 32])]
            resp = client.post("/v1/classify", params={"model": model, "top_k": 1}, files=files)
            resp.raise_for_status()
            answers = [int(p["top_k"][0]["label"]) for p in resp.json()["predictions"]]
            right += int(np.sum(np.asarray(answers) == labels[start : start + 32]))
    return right / len(bodies)


def redistill(run: Path, stack: Stack, out: Path, epochs: int, extra: list[str], export: bool) -> dict:
    command = [sys.executable, "-m", "training", "redistill", "--run", str(run), "--capture", str(stack.capture)]
    command += ["--repo", str(stack.repo), "--out", str(out), "--set", f"redistill.epochs={epochs}", *extra]
    command += [] if export else ["--no-export"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    (out.parent / f"{out.name}.log").write_text(done.stdout + done.stderr)
    if done.returncode not in (0, 2):
        raise UserError(f"redistill failed ({done.returncode}): {done.stderr[-2000:]}")
    report = json.loads((out / "redistill.json").read_text())
    return {"exit_code": done.returncode, "seconds": round(time.perf_counter() - started, 1), "report": report}


@dataclass
class Watch:
    """Each replica's candidate weight, sampled every 0.2 s in a thread: when the candidate first answered all
    of the name's traffic on every replica, and the most it ever had."""

    stack: Stack
    candidate: str
    samples: list[tuple[float, list[float]]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Watch:
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                weights = [
                    self.stack.get(url, "/v1/experiment")["experiment"]["weights"].get(self.candidate, 0.0)
                    for url in self.stack.urls
                ]
                self.samples.append((time.time(), weights))
            except httpx.HTTPError:
                pass
            self.stop.wait(0.2)

    def all_traffic_at(self) -> float | None:
        return next((t for t, w in self.samples if min(w) >= 1.0), None)


def rollout(stack: Stack, candidate: str, plan: LoopPlan, images: Path, label: str) -> dict:
    """The gated rollout of `candidate` under Locust, the controller promoting or rejecting it in the repository."""
    events = stack.work / f"rollout-{label}-events.jsonl"
    start_experiment_file(stack.experiment_file, rollout_experiment(candidate, plan))
    command = [sys.executable, "-m", "gateway", "rollout", "--experiment-file", str(stack.experiment_file)]
    for url in stack.urls:
        command += ["--metrics-url", f"{url}/metrics"]
    command += ["--interval", "1", "--events", str(events), "--repo", str(stack.repo)]
    watch = Watch(stack, candidate).start()
    ended: list[float] = []

    def finished() -> bool:
        phase = json.loads(stack.experiment_file.read_text()).get("state", {}).get("phase")
        if not ended and phase in ("promoted", "rolled_back"):
            ended.append(time.monotonic())
        return bool(ended) and time.monotonic() - ended[0] >= 5

    with (stack.work / f"controller-{label}.log").open("w") as log:
        controller = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            load = stack.load(f"rollout-{label}", images, plan.poison, plan.rollout_max_s, finished)
        finally:
            controller.terminate()
            controller.wait(timeout=30)
            watch.stop.set()
    state = json.loads(stack.experiment_file.read_text())["state"]
    name = candidate.partition("@")[0]
    outcome = state["phase"]
    if outcome == "running":  # not shown better within the deadline: the loop ends its trial
        subprocess.run(
            [sys.executable, "-m", "training", "versions", "reject", candidate, "--repo", str(stack.repo)], check=True
        )
        outcome = "not promoted (pending at the deadline)"
    promoted_at = next((e["at"] for e in state["history"] if e["event"] == "promoted"), None)
    ended_at = next((e["at"] for e in state["history"] if e["event"] in ("promoted", "rolled_back")), time.time())
    full = watch.all_traffic_at()
    until_outcome = max((max(w) for t, w in watch.samples if t < ended_at), default=0.0)
    manifest = read_manifest(stack.repo).models[name]
    return {
        "candidate": candidate,
        "outcome": outcome,
        "reason": state["reason"],
        "steps": [
            {k: e[k] for k in ("event", "step", "weight", "reason", "verdicts")} | {"at": round(e["at"], 2)}
            for e in state["history"]
        ],
        "promoted_at": promoted_at,
        "candidate_answered_all_traffic_at": full,
        "all_traffic_only_after_the_last_gate": full is None or (promoted_at is not None and full >= promoted_at),
        "candidate_max_weight_until_outcome": until_outcome,
        "current_version_min_share_until_outcome": round(1 - until_outcome, 3),
        "manifest_after": {
            "current": manifest.version,
            "candidate": manifest.candidate.version if manifest.candidate else None,
        },
        "locust": {"exit_code": load["locust_exit_code"], **locust_totals(stack.work / f"locust-rollout-{label}")},
        "seconds": load["wall_seconds"],
    }  # fmt: skip


def new_style(stack: Stack, plan: LoopPlan, images: Path) -> dict:
    """The italic traffic until the drift flag on the served student's version, then `after_drift_s` more for
    the capture."""
    version = read_manifest(stack.repo).models[STUDENT_KD].version
    before = [v.get("images", 0) for v in stack.drift(version)]
    flagged: dict = {}

    def stop() -> bool:
        if not flagged:
            verdicts = stack.drift(version)
            hit = next((v for v in verdicts if v.get("detected")), None)
            if hit is not None:
                flagged.update(
                    at=time.monotonic(),
                    images_since_style_changed=sum(v.get("images", 0) for v in verdicts) - sum(before),
                    strongest=hit["strongest"],
                    evidence_log10=round(hit["evidence_log10"][hit["strongest"]], 2),
                    threshold_log10=round(hit["threshold_log10"], 2),
                )
        return bool(flagged) and time.monotonic() - flagged["at"] >= plan.after_drift_s

    load = stack.load("new-style", images, plan.poison, plan.new_style_max_s + plan.after_drift_s, stop)
    if not flagged:
        raise UserError(f"the drift test did not flag the new style within {plan.new_style_max_s} s")
    flagged.pop("at")
    return {"drift": flagged, "seconds": load["wall_seconds"]}


def run_loop(run: Path, repo: Path, out: Path, work: Path, plan: LoopPlan) -> dict:
    """The whole loop on a stack of its own in `work`; results in `out`."""
    for needed in (run / "results.json", repo / "manifest.json"):
        if not needed.is_file():
            raise UserError(f"{needed} not found: train and export the demo first (make models)")
    started = time.perf_counter()
    split = read_manifest(repo).split
    traffic, test = pools(split)
    digits, labels = digits_gray()
    results: dict = {"cpu": cpu_description(), "poison": plan.poison, "slant": SLANT}
    with Stack(repo, work) as stack:
        upright_only = traffic_folder(work / "images-upright", traffic, 0.0, seed=1)
        mixed = traffic_folder(work / "images-mixed", traffic, 0.5, seed=2)
        load = stack.load("before", upright_only, False, plan.before_s)
        quiet = stack.drift(read_manifest(stack.repo).models[STUDENT_KD].version)
        if any(v.get("detected") for v in quiet):
            raise UserError(f"the drift test flagged the upright traffic, before the new style: {quiet}")
        results["before"] = {
            "seconds": load["wall_seconds"],
            "drift": [{k: v.get(k) for k in ("images", "detected")} for v in quiet],
        }
        results["new_style"] = new_style(stack, plan, mixed)
        print(f"[loop] drift flagged: {results['new_style']['drift']}", flush=True)

        held_upright = [upright(digits[i], np.random.default_rng(int(i))) for i in test]
        held_italic = [italic(digits[i]) for i in test]
        results["candidates"] = []
        attempts = [("trusted labels", [], not plan.poison)]
        if plan.poison:
            attempts.append(("every key's labels", ["--set", "redistill.label_key_margin=1.0"], True))
        for label, extra, export in attempts:
            made = redistill(
                run, stack, work / f"redistill-{len(results['candidates'])}", plan.redistill_epochs, extra, export
            )
            report = made["report"]
            entry = {
                "labels_from": label,
                "seconds": made["seconds"],
                "captured_images": report["captured_images"],
                "captured_labelled": report["captured_labelled"],
                "labels": report["labels"],
                "offline": report["candidate"]["offline"],
                "exported": "export" in report,
            }  # fmt: skip
            results["candidates"].append(entry)
            if "export" not in report:
                continue
            candidate = report["export"]["candidate"]
            deadline = time.monotonic() + 60
            while not all(candidate in stack.get(u, "/readyz").get("versions", {}) for u in stack.urls):
                if time.monotonic() > deadline:
                    raise UserError(f"{candidate} was not served within 60 s")
                time.sleep(0.5)
            entry["served_top1"] = {
                name: {
                    "upright": top1(stack, name, held_upright, labels[test]),
                    "italic": top1(stack, name, held_italic, labels[test]),
                }
                for name in (STUDENT_KD, candidate)
            }
            entry["rollout"] = rollout(stack, candidate, plan, mixed, str(len(results["candidates"])))
            print(f"[loop] {candidate}: {entry['rollout']['outcome']}", flush=True)
        # The candidate that went through the online gates (the last exported), under the names the issue asks.
        served = [c for c in results["candidates"] if c["exported"]]
        results["candidate"] = served[-1] if served else results["candidates"][-1]
        results["rollout"] = results["candidate"].get("rollout", {"outcome": "not served: refused offline"})
        results["requests"] = request_counts(stack.metrics())
        results["server_errors"] = sum(v for k, v in results["requests"]["by_status"].items() if k.endswith("5xx"))
        results["feedback_key_labels"] = {
            key: {
                agrees: sum(metric_value(t, "kdserve_feedback_key_labels_total", {"key": key, "agrees": agrees})
                            for t in stack.metrics())
                for agrees in ("true", "false")
            }
            for key in (["honest", "hostile"] if plan.poison else ["honest"])
        }  # fmt: skip
    results["seconds"] = round(time.perf_counter() - started, 1)
    write_results(out, results, markdown(results))
    return results


def _interval(figures: dict) -> str:
    low, high = figures["interval"]
    return f"[{low * 100:+.2f}, {high * 100:+.2f}]"


def markdown(r: dict) -> str:
    drift = r["new_style"]["drift"]
    lines = [
        f"# The loop{' with a hostile label key' if r['poison'] else ''}: traffic -> drift -> capture -> "
        "re-distillation -> offline gate -> candidate -> gated rollout",
        "",
        f"CPU: {r['cpu']}. Whole loop {r['seconds']:.0f} s (`make loop{' POISON=1' if r['poison'] else ''}`), two "
        f"gateway replicas, {USERS} Locust users, the rollout controller. 5xx over the whole run: "
        f"**{r['server_errors']}**.",
        "",
        f"Before: {r['before']['seconds']:.0f} s of upright digits in random client forms; the student's drift "
        f"test counted {sum(v['images'] or 0 for v in r['before']['drift'])} answers and flagged nothing. Then "
        f"half the traffic turned italic (slant {r['slant']}): the drift test flagged "
        f"{STUDENT_KD} after **{drift['images_since_style_changed']}** answers of the mixed traffic "
        f"({drift['strongest']}, log10 e-value {drift['evidence_log10']} >= {drift['threshold_log10']}), and "
        "the capture went on for the re-distillation.",
        "",
    ]
    for c in r["candidates"]:
        lines += _candidate(c)
    keys = r["feedback_key_labels"]
    lines += [
        "Labels agreeing with the answer they label, per key (`kdserve_feedback_key_labels_total`): "
        + "; ".join(f"{k}: {int(v['true'])} agree, {int(v['false'])} disagree" for k, v in keys.items())
        + ".",
        "",
        f"Requests by status (both replicas): {r['requests']['by_status']}.",
    ]
    return "\n".join(lines) + "\n"


def _gate(g: dict) -> str:
    low, high = g["interval"]
    return f"{g['gate']} {g['status']} ([{low:.3g}, {'inf' if high is None else f'{high:.3g}'}], n={g['samples']})"


def _candidate(c: dict) -> list[str]:
    offline = c["offline"]
    rows = [
        [name, percent(f["candidate"]), percent(f["served"]), _interval(f)]
        for name, f in (("top-1", offline["top1"]), ("agreement with the teacher", offline["agreement"]))
    ]
    labels = "; ".join(
        f"{key}: {k['labels']} labels, {'used' if k['used'] else '**excluded**'} ({k['reason']})"
        for key, k in c["labels"]["by_key"].items()
    )
    lines = [
        f"## Candidate from {c['labels_from']}",
        "",
        f"Re-distilled in {c['seconds']:.0f} s from {c['captured_images']} captured images "
        f"({c['captured_labelled']} labelled). Label keys: {labels}.",
        "",
        f"Offline gate (paired, held-out test split, upright 8x8): **{'passed' if offline['passed'] else 'refused'}**"
        f" — {offline.get('reason', '')}",
        "",
        markdown_table(["", "candidate", "served", "difference, points"], rows),
        "",
    ]
    if not c["exported"]:
        return [*lines, "Not exported" + (": refused offline." if not offline["passed"] else " (report only)."), ""]
    served = c["served_top1"]
    rows = [[name, percent(f["upright"]), percent(f["italic"])] for name, f in served.items()]
    ro = c["rollout"]
    steps = [
        [e["event"], str(e["step"]), f"{e['weight']:.0%}", "; ".join(_gate(g) for g in e["verdicts"]) or "-"]
        for e in ro["steps"]
    ]
    lines += [
        "Held-out digits through the gateway, by name:",
        "",
        markdown_table(["version", "upright", "italic"], rows),
        "",
        f"Rollout of `{ro['candidate']}`: **{ro['outcome']}** ({ro['reason']}). Locust: {ro['locust']['requests']} "
        f"requests, {ro['locust']['failures']} failures, {ro['seconds']:.0f} s. The current version answered at "
        f"least {ro['current_version_min_share_until_outcome']:.0%} of the name's traffic until the outcome (on "
        "every replica, sampled every 0.2 s); the candidate "
        + (
            f"answered all of it from {ro['candidate_answered_all_traffic_at'] - ro['promoted_at']:+.2f} s after "
            "the promotion (the last gate passed)"
            if ro["candidate_answered_all_traffic_at"] and ro["promoted_at"]
            else "never answered all of it"
        )
        + f". Manifest after: current version {ro['manifest_after']['current']}, candidate "
        f"{ro['manifest_after']['candidate']}.",
        "",
        markdown_table(["event", "step", "candidate weight", "gates at the decision"], steps, "l r r l"),
        "",
    ]
    return lines
