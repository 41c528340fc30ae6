"""Command line: `python -m loadtest <command>`."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path


def _cmd_demo(args: argparse.Namespace) -> None:
    from gateway.triton.server import TritonPorts
    from loadtest.stacks.demo import DemoClock, run_demo

    ports = TritonPorts(args.http_port, args.grpc_port, args.metrics_port)
    clock = DemoClock(args.started_at, args.record)
    run_demo(Path(args.repo), args.port, ports, args.once, args.then, clock, Path(args.state), args.rollout)


def _cmd_rollout(args: argparse.Namespace) -> None:
    from loadtest.stacks.rollout import RolloutPlan, run_rollout

    plan = RolloutPlan(seconds=args.seconds, users=args.users)
    results = run_rollout(Path(args.repo), Path(args.out), plan, args.break_student, Path(args.bench_results))
    name = "rollout-broken.md" if args.break_student else "rollout.md"
    print((Path(args.out) / name).read_text())
    expected = "rolled_back" if args.break_student else "promoted"
    if results["phase"] != expected or results["locust"]["failures"]:
        raise SystemExit(
            f"rollout ended {results['phase']} (expected {expected}), {results['locust']['failures']} failures"
        )


def _cmd_loop(args: argparse.Namespace) -> None:
    from loadtest.stacks.loop import LoopPlan, run_loop

    results = run_loop(Path(args.run), Path(args.repo), Path(args.out), Path(args.work), LoopPlan(poison=args.poison))
    print((Path(args.out) / "results.md").read_text())
    if results["server_errors"]:
        raise SystemExit(f"{results['server_errors']} server errors during the loop")


def _cmd_byo(args: argparse.Namespace) -> None:
    from loadtest.benchmarks.byo import run_byo

    run_byo(Path(args.work), Path(args.run), Path(args.out))
    print((Path(args.out) / "results.md").read_text())


def _cmd_capture_cost(args: argparse.Namespace) -> None:
    from loadtest.benchmarks.capture_cost import capture_cost

    capture_cost(Path(args.repo), Path(args.out), args.requests)
    print((Path(args.out) / "capture_cost.md").read_text())


def _cmd_statistics(args: argparse.Namespace) -> None:
    from loadtest.benchmarks.statistics_study import run_study

    run_study(Path(args.out))
    print((Path(args.out) / "statistics.md").read_text())


def _cmd_bench(args: argparse.Namespace) -> None:
    from loadtest.benchmarks.bench import run_bench

    run_bench(
        Path(args.repo),
        Path(args.out),
        Path(args.timing_repo) if args.timing_repo else None,
        args.requests,
        Path(args.run) if args.run else None,
    )
    print(f"[bench] results in {Path(args.out) / 'results.md'}")


def _cmd_protocols(args: argparse.Namespace) -> None:
    from loadtest.benchmarks.protocols import run_protocols

    run_protocols(Path(args.repo), Path(args.out), args.requests)
    print(f"[protocols] results in {Path(args.out) / 'results.md'}")


def _cmd_served_accuracy(args: argparse.Namespace) -> None:
    import httpx

    from loadtest.clients.served_accuracy import markdown, served_accuracy, write

    def measure(url: str) -> dict:
        with httpx.Client(base_url=url, timeout=120) as client:
            return served_accuracy(client)

    if args.host:
        results = measure(args.host)
    else:
        from gateway.process import serving

        with serving(Path(args.repo)) as (_, gateway):
            results = measure(gateway.url)
    write(results, Path(args.out))
    print(markdown(results))


def _cmd_cascade(args: argparse.Namespace) -> None:
    from loadtest.benchmarks.cascade import check_cascade, write

    results = check_cascade(Path(args.repo), args.requests)
    path = write(results, Path(args.out))
    print(path.read_text())
    if not all(results["checks"].values()):
        raise SystemExit(1)


def _cmd_faults(args: argparse.Namespace) -> None:
    from kdcontract.machine import cpu_description
    from loadtest.benchmarks.faults import run_faults

    print(run_faults(Path(args.repo), Path(args.out), cpu_description()).read_text())


def _cmd_soak(args: argparse.Namespace) -> None:
    from kdcontract.machine import cpu_description
    from loadtest.benchmarks.soak import run_soak, write

    results = run_soak(Path(args.repo), args.minutes, args.clients)
    print(write(results, Path(args.out), cpu_description()).read_text())
    if results["errors"] or results["gateway_rss_growth"] > 0.05:
        raise SystemExit(1)


def _cmd_dashboard(args: argparse.Namespace) -> None:
    from kdcontract.machine import cpu_description
    from loadtest.stacks.dashboard import run_dashboard

    print(run_dashboard(Path(args.repo), args.minutes, args.clients, Path(args.out), cpu_description()).read_text())


def _cmd_run(args: argparse.Namespace) -> None:
    from loadtest.clients.report import write_report
    from loadtest.clients.run import run_load

    summary = run_load(
        args.host,
        args.scenario,
        args.users,
        args.duration,
        Path(args.out),
        args.triton_metrics,
        args.stages,
        args.max_fail_ratio,
        args.triton_http or None,
    )
    report = write_report(Path(args.out))
    print(f"[loadtest] {args.scenario}: locust exit code {summary['locust_exit_code']}; report {report}")
    if summary["locust_exit_code"] != 0:
        raise SystemExit(summary["locust_exit_code"])


def _cmd_headline(args: argparse.Namespace) -> None:
    from loadtest.benchmarks.headline import write_headline

    changed = write_headline(Path(args.readme), Path(args.benchmarks))
    print(f"[headline] {args.readme} {'updated' if changed else 'already current'}")


def _cmd_report(args: argparse.Namespace) -> None:
    from loadtest.clients.report import write_report

    print(f"[loadtest] {write_report(Path(args.run))}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="start Triton + gateway and classify held-out digits over HTTP")
    demo.add_argument("--repo", default="model_repository")
    demo.add_argument("--port", type=int, default=8080, help="gateway port")
    demo.add_argument("--http-port", type=int, default=8000, help="Triton HTTP port")
    demo.add_argument("--grpc-port", type=int, default=8001, help="Triton gRPC port")
    demo.add_argument("--metrics-port", type=int, default=8002, help="Triton metrics port")
    demo.add_argument("--once", action="store_true", help="exit after the demo instead of serving on")
    demo.add_argument(
        "--then",
        metavar="COMMAND",
        action="append",
        help="a shell command run while serving that exports more models into the repository (make demo: "
        "the teacher and the KD student, then the rest of the recipe); repeatable, run in turn; the models "
        "each adds are shown once served",
    )
    demo.add_argument("--started-at", type=float, help="epoch seconds the demo began (make demo: after set-up)")
    demo.add_argument("--record", type=Path, help="JSON file for the seconds from --started-at to the page serving")
    demo.add_argument(
        "--rollout",
        action="store_true",
        help="end with a rollout of the student under Locust, with the held-out labels as feedback",
    )
    demo.add_argument("--state", default="runs/demo-state", help="the demo's experiment file, answers and rollout")
    demo.set_defaults(func=_cmd_demo)

    rollout = commands.add_parser(
        "rollout", help="a student rollout under Locust with feedback, two replicas; --break-student: the rollback"
    )
    rollout.add_argument("--repo", default="model_repository")
    rollout.add_argument("--out", default="benchmarks/rollout")
    rollout.add_argument(
        "--seconds", type=int, default=240, help="Locust's run time at most (it stops 10 s after the rollout)"
    )
    rollout.add_argument("--users", type=int, default=4)
    rollout.add_argument("--break-student", action="store_true", help="export a broken student mid-rollout")
    rollout.add_argument("--bench-results", default="benchmarks/results.json", help="offline latency figures")
    rollout.set_defaults(func=_cmd_rollout)

    loop = commands.add_parser(
        "loop",
        help="traffic -> drift -> capture -> re-distillation -> offline gate -> candidate -> gated rollout",
    )
    loop.add_argument("--run", default="runs/digits", help="the demo's trained run (teacher, KD student)")
    loop.add_argument("--repo", default="model_repository", help="its exported repository (student and teacher copied)")
    loop.add_argument("--out", default="benchmarks/loop", help="where results.{md,json} go")
    loop.add_argument("--work", default="runs/loop", help="the loop's own stack: repository copy, capture, logs")
    loop.add_argument("--poison", action="store_true", help="a second key labels 30%% of the traffic wrong")
    loop.set_defaults(func=_cmd_loop)

    byo = commands.add_parser(
        "byo", help="teachers brought back from files and their students: accuracy, MACs, served p50 (make byo)"
    )
    byo.add_argument("--work", default="runs/byo", help="`training bring-back`'s folder, each recipe's run and -repo")
    byo.add_argument("--run", default="runs/digits", help="the run the teacher came from (its figures beside them)")
    byo.add_argument("--out", default="benchmarks/byo")
    byo.set_defaults(func=_cmd_byo)

    cost = commands.add_parser("capture-cost", help="capture on vs off in one run: p50 at c=1, throughput at 16")
    cost.add_argument("--repo", default="model_repository")
    cost.add_argument("--out", default="benchmarks")
    cost.add_argument("--requests", type=int, default=2000)
    cost.set_defaults(func=_cmd_capture_cost)

    statistics = commands.add_parser("statistics", help="the A/B statistics on simulated streams: false alarms, power")
    statistics.add_argument("--out", default="benchmarks/rollout")
    statistics.set_defaults(func=_cmd_statistics)

    protocols = commands.add_parser(
        "protocols", help="/v1/classify vs v2 REST vs v2 gRPC vs tracing on, against Triton direct, one run"
    )
    protocols.add_argument("--repo", default="model_repository")
    protocols.add_argument("--out", default="benchmarks/protocols")
    protocols.add_argument("--requests", type=int, default=1000, help="requests per path at concurrency 1")
    protocols.set_defaults(func=_cmd_protocols)

    bench = commands.add_parser("bench", help="latency of in-process ORT vs Triton vs gateway, one run")
    bench.add_argument("--repo", default="model_repository")
    bench.add_argument("--out", default="benchmarks")
    bench.add_argument(
        "--timing-repo", help="a second repository (python -m training timing-repo) timed at its own image size"
    )
    bench.add_argument("--requests", type=int, default=1000, help="student calls at concurrency 1")
    bench.add_argument(
        "--run",
        default=None,
        help="the training run the repository was exported from: adds served latency to its "
        "accuracy-cost report (written to --out as pareto.md/.png)",
    )
    bench.set_defaults(func=_cmd_bench)

    cascade = commands.add_parser("cascade", help="the served cascade vs its student and teacher: top-1, mean latency")
    cascade.add_argument("--repo", required=True, help="a model repository whose manifest has a cascade")
    cascade.add_argument("--out", default="benchmarks/cascade")
    cascade.add_argument("--requests", type=int, default=300, help="one-image requests per model for latency")
    cascade.set_defaults(func=_cmd_cascade)

    faults = commands.add_parser("faults", help="hostile input and faults (kill, freeze, overload, SIGTERM): a table")
    faults.add_argument("--repo", default="model_repository")
    faults.add_argument("--out", default="benchmarks")
    faults.set_defaults(func=_cmd_faults)

    soak = commands.add_parser("soak", help="minutes of mixed traffic: memory, descriptors, latency, errors")
    soak.add_argument("--repo", default="model_repository")
    soak.add_argument("--minutes", type=float, default=10.0)
    soak.add_argument("--clients", type=int, default=8)
    soak.add_argument("--out", default="benchmarks/soak")
    soak.set_defaults(func=_cmd_soak)

    dashboard = commands.add_parser(
        "dashboard", help="the Grafana dashboard's panels drawn from a real Prometheus over served traffic"
    )
    dashboard.add_argument("--repo", default="model_repository")
    dashboard.add_argument("--minutes", type=float, default=3.0)
    dashboard.add_argument("--clients", type=int, default=4)
    dashboard.add_argument("--out", default="benchmarks/dashboard")
    dashboard.set_defaults(func=_cmd_dashboard)

    run = commands.add_parser("run", help="Locust headless against the gateway; CSVs, metrics, report")
    run.add_argument("--host", default="http://127.0.0.1:8080", help="the gateway")
    run.add_argument("--scenario", choices=["student", "teacher", "ensemble", "ab", "compare"], default="ab")
    run.add_argument("--users", type=int, default=4)
    run.add_argument("--duration", default="60s", help="e.g. 60s or 2m (ignored with --stages)")
    run.add_argument("--stages", help='load steps "seconds:users,...", e.g. "20:1,20:2,20:4"')
    run.add_argument("--out", default="runs/loadtest")
    run.add_argument("--triton-metrics", default="http://127.0.0.1:8002/metrics")
    run.add_argument(
        "--triton-http",
        default="127.0.0.1:8000",
        help="Triton for perf_analyzer at the same concurrencies ('' skips it)",
    )
    run.add_argument("--max-fail-ratio", type=float, default=0.01, help="stop rule")
    run.set_defaults(func=_cmd_run)

    accuracy = commands.add_parser(
        "served-accuracy", help="top-1 of the held-out split sent through the gateway in every client form"
    )
    accuracy.add_argument("--repo", default="model_repository", help="served by its own Triton + gateway")
    accuracy.add_argument("--host", help="a running gateway instead, e.g. http://127.0.0.1:8080")
    accuracy.add_argument("--out", default="benchmarks/served_accuracy", help="writes <out>.md and <out>.json")
    accuracy.set_defaults(func=_cmd_served_accuracy)

    headline = commands.add_parser("headline", help="the README's headline table from the committed benchmark files")
    headline.add_argument("--readme", default="README.md")
    headline.add_argument("--benchmarks", default="benchmarks")
    headline.set_defaults(func=_cmd_headline)

    report = commands.add_parser("report", help="report.md and charts from a run directory")
    report.add_argument("run")
    report.set_defaults(func=_cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    from gateway.process import GatewayStartError
    from gateway.triton.server import TritonError
    from kdcontract.errors import UserError

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would bury the results
    args = build_parser().parse_args(argv)
    # SIGTERM (what `timeout`, a CI cancel or a supervisor sends) unwinds like Ctrl-C: the gateways and
    # Tritons a command started are stopped by the same `with` blocks, and the exit status says why.
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        args.func(args)
    except (UserError, TritonError, GatewayStartError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)  # one line and exit code 2, as every kdserve command
        return 2
    except KeyboardInterrupt:
        return 128 + signal.SIGTERM if _terminated else 130
    return 0


_terminated = False


def _interrupted(signum: int, frame) -> None:
    global _terminated
    _terminated = True
    raise KeyboardInterrupt
