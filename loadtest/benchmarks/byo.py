"""`python -m loadtest byo` (`make byo`): teachers brought from files, and the students distilled from them.

`python -m training bring-back` wrote the digits run's trained teacher as a `state_dict` and as a float NCHW
ONNX graph, with a recipe per (form, student); `make byo` distilled and exported each into its own
repository. This measures every one of them in one run, on one machine:

- from each run's results: the teacher's and the student's top-1 on the held-out test split, the student's
  agreement with its teacher there, parameters and MACs (an ONNX teacher's counted from its graph);
- served, with Triton and the gateway in front of each repository: p50 of one-image requests at 1 client
  (in-process ONNX Runtime on the very graph Triton serves, and through the gateway, interleaved) and at 16
  clients (the gateway's p50 and throughput, in-process threads' throughput), with Triton's own mean compute
  per request.

The trained teacher's own figures (the run it came from) stand beside them: a teacher reloaded from a file
must answer as the one that was trained.
"""

from __future__ import annotations

import json
from pathlib import Path

from gateway.process import serving
from kdcontract.machine import cpu_description
from kdcontract.names import STUDENT_KD, TEACHER
from kdcontract.tables import markdown_table, percent, write_results
from loadtest.benchmarks.bench import LOAD_SECONDS, Served, latency_c1
from loadtest.clients.measure import load_async, load_threads

CLIENTS = 16
REQUESTS_C1 = 300


def served_figures(served: Served, model: str) -> dict:
    """p50 at 1 client (in-process vs gateway, interleaved) and at CLIENTS (in-process threads vs gateway)."""
    one = latency_c1(served, model, model, REQUESTS_C1)
    before = served.stats(model)
    many = load_async(served.gateway_async(model), CLIENTS, LOAD_SECONDS)
    triton_many = (served.stats(model) - before).figures()
    return {
        "c1": {path: one[path]["p50_ms"] for path in ("in_process", "triton_direct", "gateway")},
        "c1_triton_compute_ms": one["gateway"]["triton"].get("compute_ms"),
        f"c{CLIENTS}": {"in_process": load_threads(served.in_process(model), CLIENTS, LOAD_SECONDS), "gateway": many},
        f"c{CLIENTS}_triton_compute_ms": triton_many.get("compute_ms"),
    }


def run_byo(work: Path, origin: Path, out: Path) -> dict:
    """Every `<work>/<form>-<student>` run and its `-repo`, measured; results.{json,md} in `out`."""
    trained = json.loads((origin / "results.json").read_text())["models"]
    results: dict = {
        "cpu": cpu_description(),
        "origin": str(origin),
        "trained_teacher": {k: trained[TEACHER][k] for k in ("top1", "params", "macs", "arch")},
        "runs": {},
    }
    for recipe in sorted(work.glob("*.yaml")):
        name = recipe.stem
        run, repo = work / name, work / f"{name}-repo"
        models = json.loads((run / "results.json").read_text())["models"]
        entry = {"models": {m: models[m] for m in (TEACHER, STUDENT_KD)}, "served": {}}
        with serving(repo) as (triton, gateway):
            served = Served(repo, triton, gateway)
            try:
                for model in (TEACHER, STUDENT_KD):
                    entry["served"][model] = served_figures(served, model)
                    entry["models"][model]["served_arch"] = served.manifest.models[model].arch
                    print(f"[byo] {name} {model}: {entry['served'][model]}", flush=True)
            finally:
                served.close()
        results["runs"][name] = entry
    write_results(out, results, markdown(results))
    return results


def _millions(x: float | None) -> str:
    return "—" if x is None else f"{x / 1e6:.2f} M"


def markdown(r: dict) -> str:
    header = [
        "run (teacher form -> student)", "model", "served as", "top-1", "agreement with the teacher", "params",
        "MACs", "p50 c=1 in-process", "p50 c=1 gateway", f"p50 c={CLIENTS} gateway", f"req/s c={CLIENTS} in-process",
        f"req/s c={CLIENTS} gateway",
    ]  # fmt: skip
    rows = []
    t = r["trained_teacher"]
    origin = ["the trained teacher (origin run)", TEACHER, t["arch"], percent(t["top1"]), "—"]
    rows.append([*origin, _millions(t["params"]), _millions(t["macs"]), "", "", "", "", ""])
    for name, run in r["runs"].items():
        for model in (TEACHER, STUDENT_KD):
            m, s = run["models"][model], run["served"][model]
            many = s[f"c{CLIENTS}"]
            rows.append([
                name, model, m["served_arch"], percent(m["top1"]), percent(m.get("teacher_agreement")),
                _millions(m["params"]), _millions(m["macs"]), f"{s['c1']['in_process']:.2f} ms",
                f"{s['c1']['gateway']:.2f} ms", f"{many['gateway']['p50_ms']:.2f} ms",
                f"{many['in_process']['throughput_per_s']:.0f}", f"{many['gateway']['throughput_per_s']:.0f}",
            ])  # fmt: skip
    first = next(iter(r["runs"]))
    alone = r["runs"][first]["served"][STUDENT_KD][f"c{CLIENTS}"]["in_process"]
    return "\n".join([
        "# Teachers brought from files, and their students",
        "",
        f"CPU: {r['cpu']}. `make byo`: the digits run's trained teacher (`{r['origin']}`) written out as a "
        "`state_dict` and as a float NCHW ONNX graph (`python -m training bring-back`), each brought back by a "
        "recipe (`teacher.file`) and distilled into a student (`--only student_kd`, the run's schedule), both "
        "exported and served by Triton behind the gateway. Top-1 and agreement on the held-out test split (270 "
        "digits); p50 of one-image requests: in-process is ONNX Runtime on the graph Triton serves, interleaved "
        f"with the gateway at 1 client, in {CLIENTS} threads at {CLIENTS} clients. In-process at {CLIENTS} "
        "threads is given as throughput, not p50: Python threads take turns at the interpreter lock in 5 ms "
        f"slices, so the median call is one that ran alone (this run, {first}'s student in {CLIENTS} threads: p50 "
        f"{alone['p50_ms']:.2f} ms, mean {alone['mean_ms']:.2f} ms, p99 {alone['p99_ms']:.2f} ms) and only the "
        f"mean, which is {CLIENTS} / throughput, says what a call costs. "
        "An ONNX teacher's weights are counted from its graph, where the exporter folded each batch norm into "
        "its convolution: fewer weights than the checkpoint's, the same network and the same MACs.",
        "",
        markdown_table(header, rows, "l l l r r r r r r r r r"),
        "",
    ])  # fmt: skip
