"""Command line: `python -m gateway <command>`."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from pydantic import ValidationError

from gateway.errors import GatewayError
from gateway.experiments.file import read_experiment, write_experiment
from gateway.triton.server import EmbeddedTriton, TritonError, TritonPorts


def _cmd_triton(args: argparse.Namespace) -> None:
    server = EmbeddedTriton(
        Path(args.repo),
        TritonPorts(args.http_port, args.grpc_port, args.metrics_port),
        host=args.host,
        log_file=Path(args.log) if args.log else None,
    )
    server.start(timeout=args.ready_timeout)
    print(
        f"triton ready: http://{server.http_url}  grpc {server.grpc_url}  "
        f"metrics http://{args.host}:{args.metrics_port}/metrics  (Ctrl-C stops)",
        flush=True,
    )
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    server.stop()


def _cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from gateway.app.factory import create_app
    from gateway.http.protocol import with_deadlines
    from gateway.http.server import DrainingServer
    from gateway.settings import GatewaySettings

    # Only flags the user gave override: arguments outrank KDSERVE_* variables in pydantic-settings,
    # so passing argparse defaults would silently mask the environment.
    given = {
        "repo": args.repo,
        "host": args.host,
        "port": args.port,
        "triton_url": args.triton_url,
        "embedded_triton": args.embedded_triton,
    }
    settings = GatewaySettings(**{key: value for key, value in given.items() if value is not None})
    app = create_app(settings)
    print(
        f"gateway: http://{settings.host}:{settings.port}  docs http://{settings.host}:{settings.port}/docs  "
        f"metrics http://{settings.host}:{settings.port}/metrics  triton {settings.triton_url}"
        f"{' (embedded)' if settings.embedded_triton else ''}",
        flush=True,
    )
    # uvloop + httptools: the fast event loop and HTTP parser; one worker, since the model work is in Triton.
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=with_deadlines(settings.header_timeout_s, settings.body_timeout_s),
        log_level=args.log_level,
        access_log=False,
        # Nothing here reads client addresses, and the X-Forwarded-* rewrite costs on every request.
        proxy_headers=False,
        timeout_graceful_shutdown=settings.shutdown_grace_s,
    )
    DrainingServer(config, app.state, settings.drain_s).run()


def _cmd_rollout(args: argparse.Namespace) -> None:
    from prometheus_client import start_http_server

    from gateway.experiments.controller import ControllerMetrics, RolloutController
    from gateway.experiments.sources import CountSource, PrometheusCounts, ReplicaCounts

    if bool(args.prometheus) == bool(args.metrics_url):
        raise GatewayError("give --prometheus URL, or --metrics-url for each gateway replica (not both)")
    if args.prometheus and not args.prometheus_selector:
        raise GatewayError(
            "--prometheus needs --prometheus-selector naming the gateways to judge "
            '(e.g. \'job="kdserve-gateway",namespace="prod"\'): without one, every gateway Prometheus scrapes counts'
        )
    counts: CountSource
    if args.prometheus:
        counts = PrometheusCounts(args.prometheus, args.prometheus_selector)
        source = f"Prometheus {args.prometheus} {{{args.prometheus_selector}}}"
    else:
        counts, source = ReplicaCounts(tuple(args.metrics_url)), f"{len(args.metrics_url)} replica(s)' /metrics"
    experiment_file = Path(args.experiment_file)
    if args.seed and not experiment_file.exists():
        # The declared experiment (a ConfigMap, a file in the image) copied once into the shared volume,
        # where the controller then keeps its state: a restart never overwrites a rollout under way.
        write_experiment(experiment_file, read_experiment(Path(args.seed)))
        print(f"experiment seeded from {args.seed}", flush=True)
    metrics = ControllerMetrics()
    if args.port:
        start_http_server(args.port, addr=args.host, registry=metrics.registry)
    controller = RolloutController(
        Path(args.experiment_file),
        counts,
        Path(args.events) if args.events else None,
        metrics,
        repo=Path(args.repo) if args.repo else None,
    )
    print(
        f"rollout controller: {args.experiment_file} every {args.interval:g} s, figures from {source}, "
        f"events in {controller.events_file}"
        + (f", metrics http://{args.host}:{args.port}/metrics" if args.port else ""),
        flush=True,
    )
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())

    def finished() -> bool:
        if done.is_set():
            return True
        if not args.until_done:
            return False
        experiment = read_experiment(Path(args.experiment_file))
        return experiment.state.phase in ("promoted", "rolled_back")

    controller.run(args.interval, finished)


def _cmd_keys_new(args: argparse.Namespace) -> None:
    import json

    from gateway.auth.keys import new_key

    key, entry = new_key(args.id, args.scope or ["classify"], args.rate, args.max_in_flight, args.bytes_per_s)
    # The key goes to stdout once; only its entry (the hash) belongs in KDSERVE_API_KEYS or the keys file.
    print(f"key (give it to the caller; it is not stored anywhere): {key}", file=sys.stderr)
    print(json.dumps(entry))


def _cmd_erase(args: argparse.Namespace) -> None:
    from gateway.capture.sinks import LocalSink, ObjectStoreSink
    from gateway.erase import Erased, Selection, erase_answers, erase_capture

    request_ids = set(args.request_id or [])
    if args.ids_file:
        request_ids |= {line.strip() for line in Path(args.ids_file).read_text().splitlines() if line.strip()}
    selection = Selection(frozenset(request_ids), frozenset(args.key or []))
    if not selection:
        raise GatewayError("name the requests to erase: --request-id ID (repeat), --ids-file FILE or --key KEY_ID")
    if not (args.capture_dir or args.capture_url or args.answers_dir):
        raise GatewayError("name where the data is kept: --capture-dir or --capture-url, and/or --answers-dir")
    erased = Erased()
    if args.capture_dir or args.capture_url:
        location = args.capture_url or str(args.capture_dir)
        # Retention and cap are not applied here: the sinks only put and delete.
        store = ObjectStoreSink(location, 0, 0) if args.capture_url else LocalSink(Path(location), 0, 0)
        erase_capture(location, store, selection, erased)
    if args.answers_dir:
        erase_answers(Path(args.answers_dir), selection, erased)
    named = [f"{len(request_ids)} request id(s)"] + (
        [f"key(s) {', '.join(sorted(selection.keys))}"] if args.key else []
    )
    print(f"{erased.summary()} for {' and '.join(named)}", flush=True)


def _cmd_experiment_cost(args: argparse.Namespace) -> None:
    import json

    from gateway.experiment_cost import experiment_cost

    figures = experiment_cost(Path(args.repo), args.samples, args.reads)
    text = json.dumps(figures, indent=2)
    print(text, flush=True)
    if args.out:
        Path(args.out).write_text(text + "\n")


def _add_triton_port_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--http-port", type=int, default=8000, help="Triton HTTP port")
    parser.add_argument("--grpc-port", type=int, default=8001, help="Triton gRPC port")
    parser.add_argument("--metrics-port", type=int, default=8002, help="Triton metrics port")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gateway")
    commands = parser.add_subparsers(dest="command", required=True)
    triton = commands.add_parser("triton", help="run the embedded Triton server in the foreground")
    triton.add_argument("--repo", default="model_repository")
    triton.add_argument("--host", default="127.0.0.1", help="bind address (loopback unless told otherwise)")
    _add_triton_port_flags(triton)
    triton.add_argument("--log", help="append Triton's own log to this file")
    triton.add_argument("--ready-timeout", type=float, default=120.0)
    triton.set_defaults(func=_cmd_triton)

    serve = commands.add_parser("serve", help="run the HTTP gateway (settings also from KDSERVE_* variables)")
    serve.add_argument("--repo", help="model repository (default model_repository, or KDSERVE_REPO)")
    serve.add_argument("--host", help="bind address (default 127.0.0.1, or KDSERVE_HOST)")
    serve.add_argument("--port", type=int, help="port (default 8080, or KDSERVE_PORT)")
    serve.add_argument("--triton-url", help="Triton HTTP host:port (default 127.0.0.1:8000, or KDSERVE_TRITON_URL)")
    serve.add_argument(
        "--embedded-triton",
        action="store_true",
        default=None,
        help="start and supervise Triton from the repo (or KDSERVE_EMBEDDED_TRITON=true)",
    )
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=_cmd_serve)
    _add_operator_commands(commands)
    return parser


def _add_operator_commands(commands: argparse._SubParsersAction) -> None:
    """What an operator runs beside the gateways: the rollout controller, keys, erasure, a cost check."""
    rollout = commands.add_parser(
        "rollout", help="step the experiment's candidate weight by its gates; back to 0 when one fails"
    )
    rollout.add_argument("--experiment-file", required=True, help="the experiment file the replicas follow")
    rollout.add_argument("--prometheus", help="Prometheus base URL: figures from every replica the selector names")
    rollout.add_argument(
        "--prometheus-selector", help='label matchers naming the gateways to judge, e.g. job="kdserve-gateway"'
    )
    rollout.add_argument(
        "--metrics-url", action="append", help="a replica's /metrics URL (repeat for each); without Prometheus"
    )
    rollout.add_argument(
        "--repo",
        help="the model repository: a candidate arm naming a version (student_kd@2) is promoted to current there "
        "when the rollout is promoted, and unloaded when it is rolled back",
    )
    rollout.add_argument("--interval", type=float, default=5.0, help="seconds between evaluations")
    rollout.add_argument("--events", help="event log, JSON lines (default: <experiment>.events.jsonl beside it)")
    rollout.add_argument("--host", default="127.0.0.1", help="bind address of the controller's own /metrics")
    rollout.add_argument("--port", type=int, default=0, help="port of the controller's own /metrics (0: none)")
    rollout.add_argument("--seed", help="an experiment file copied to --experiment-file when that does not exist")
    rollout.add_argument("--until-done", action="store_true", help="exit once the rollout is promoted or rolled back")
    rollout.set_defaults(func=_cmd_rollout)

    keys = commands.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    new = keys.add_parser("new", help="make a key: the key on stderr, its entry for the keys file on stdout")
    new.add_argument("--id", required=True, help="the name logs and metrics give the key")
    new.add_argument(
        "--scope", action="append", choices=["classify", "admin"], help="repeat for both (default: classify)"
    )
    new.add_argument("--rate", type=float, help="requests per second (default unlimited)")
    new.add_argument(
        "--max-in-flight", type=int, help="requests under way at once (default KDSERVE_DEFAULT_KEY_MAX_IN_FLIGHT)"
    )
    new.add_argument(
        "--bytes-per-s", type=float, help="request bytes per second (default KDSERVE_DEFAULT_KEY_BYTES_PER_S)"
    )
    new.set_defaults(func=_cmd_keys_new)

    erase = commands.add_parser(
        "erase",
        help="remove the captured images, labels and A/B answers of given requests, or of every request of an "
        "API key id (data erasure)",
    )
    erase.add_argument("--request-id", action="append", help="a request id the gateway returned (repeat)")
    erase.add_argument("--ids-file", help="a file of request ids, one a line")
    erase.add_argument(
        "--key", action="append", help="an API key id: every request it made (repeat; the id, never the key)"
    )
    erase.add_argument("--capture-dir", help="the capture directory (KDSERVE_CAPTURE_DIR of the gateways)")
    erase.add_argument("--capture-url", help="the capture's s3://bucket/prefix (KDSERVE_CAPTURE_URL)")
    erase.add_argument("--answers-dir", help="the A/B answer store (KDSERVE_ANSWERS_DIR of the gateways)")
    erase.set_defaults(func=_cmd_erase)

    cost = commands.add_parser(
        "experiment-cost", help="time GET /v1/experiment, and the event loop it holds, at --samples per arm"
    )
    cost.add_argument("--repo", default="model_repository")
    cost.add_argument("--samples", type=int, default=1_000_000, help="latency observations per arm")
    cost.add_argument("--reads", type=int, default=50)
    cost.add_argument("--out", help="write the figures (JSON) here too")
    cost.set_defaults(func=_cmd_experiment_cost)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (TritonError, GatewayError, ValidationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
