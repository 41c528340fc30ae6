"""The Open Inference Protocol's gRPC binding, served by the gateway process on `KDSERVE_GRPC_PORT`.

The service is `inference.GRPCInferenceService` from the modules `tritonclient` ships (generated from
Triton's protos), so `tritonclient.grpc`, KServe's SDK and `perf_analyzer -i grpc` talk to it
unmodified. It runs grpcio's asyncio server on the gateway's event loop, next to uvicorn, and every
inference goes through `gateway.serving.inference.classify_request` like `/v1/classify` and v2 REST: the
same admission control, deadlines, A/B assignment, capture and metrics. Errors map to gRPC status
codes (`GRPC_CODES`); a 503's or 429's `Retry-After` travels as trailing metadata `retry-after`.
Methods kdserve does not offer (shared memory, repository control, statistics) answer UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import SimpleNamespace

import grpc
import numpy as np
from fastapi import FastAPI
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from gateway.auth.gate import KeyGate
from gateway.auth.keys import ANONYMOUS, Scope
from gateway.auth.scopes import requires
from gateway.errors import BadRequest, GatewayError
from gateway.feedback.answers import CLIENT_ID, new_request_id
from gateway.grpc.calls import GRPC_CODES, abort, authorization
from gateway.serving.health import not_ready
from gateway.serving.inference import classify_request, describe
from gateway.telemetry import tracing
from gateway.v2 import models as v2_models
from gateway.v2 import tensors as v2_tensors

log = logging.getLogger("kdserve.gateway")


ROUTE = "grpc:ModelInfer"  # the `route` label of the gateway's request metrics for gRPC inference


CONTENTS = {"BYTES": "bytes_contents", "UINT8": "uint_contents"}


def _parameter(value: object) -> service_pb2.InferParameter:
    if isinstance(value, bool):
        return service_pb2.InferParameter(bool_param=value)
    if isinstance(value, int):
        return service_pb2.InferParameter(int64_param=value)
    if isinstance(value, float):
        return service_pb2.InferParameter(double_param=value)
    return service_pb2.InferParameter(string_param=str(value))


def _plain(parameter: service_pb2.InferParameter) -> object:
    kind = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, kind) if kind else None


def _tensors(request: service_pb2.ModelInferRequest) -> list[v2_tensors.Tensor]:
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    tensors = []
    for i, item in enumerate(request.inputs):
        shape = list(item.shape)
        if raw:
            data: bytes | list | None = raw[i]
        else:
            field = CONTENTS.get(item.datatype)
            data = list(getattr(item.contents, field)) if field else None
        tensors.append(v2_tensors.Tensor(item.name, item.datatype, shape, data))
    return tensors


class InferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, app: FastAPI):
        self.app = app

    @property
    def state(self):
        return self.app.state

    async def _abort(self, context: grpc.aio.ServicerContext, error: GatewayError) -> None:
        self.state.metrics.errors.labels(error.kind).inc()
        await abort(context, GRPC_CODES.get(error.status_code, grpc.StatusCode.INTERNAL), error.message, error.headers)

    def _authorize(self, context: grpc.aio.ServicerContext, scope: Scope):
        gate: KeyGate = self.state.key_gate
        return gate.admit(authorization(context.invocation_metadata()), scope)

    @requires(None)
    async def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    @requires(None)
    async def ServerReady(self, request, context):
        reason, _ = await not_ready(self.state)
        return service_pb2.ServerReadyResponse(ready=reason is None)

    @requires(None)
    async def ServerMetadata(self, request, context):
        return service_pb2.ServerMetadataResponse(
            name=v2_models.SERVER_NAME, version=v2_models.SERVER_VERSION, extensions=v2_models.EXTENSIONS
        )

    async def _about_model(self, context, name: str, version: str, answer):
        """`answer(classifier)` for a model request: the caller's key checked, the version checked
        against the model's, any refusal aborted with its status code."""
        try:
            with self._authorize(context, "classify"):
                classifier = self.state.classifier
                v2_models.check_version(classifier, name, version or None)
                return await answer(classifier)
        except GatewayError as exc:
            await self._abort(context, exc)

    @requires("classify")
    async def ModelMetadata(self, request, context):
        async def metadata(classifier):
            return v2_models.metadata(classifier, request.name)

        meta = await self._about_model(context, request.name, request.version, metadata)
        tensor = service_pb2.ModelMetadataResponse.TensorMetadata
        return service_pb2.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]],
        )

    @requires("classify")
    async def ModelConfig(self, request, context):
        async def config(classifier):
            return v2_models.config(classifier, request.name, self.state.settings.max_images)

        config = await self._about_model(context, request.name, request.version, config)
        types = model_config_pb2.DataType
        return service_pb2.ModelConfigResponse(
            config=model_config_pb2.ModelConfig(
                name=config["name"],
                platform=config["platform"],
                max_batch_size=config["max_batch_size"],
                input=[
                    model_config_pb2.ModelInput(name=t["name"], data_type=types.Value(t["data_type"]), dims=t["dims"])
                    for t in config["input"]
                ],
                output=[
                    model_config_pb2.ModelOutput(name=t["name"], data_type=types.Value(t["data_type"]), dims=t["dims"])
                    for t in config["output"]
                ],
            )
        )

    @requires("classify")
    async def ModelReady(self, request, context):
        async def ready(classifier):
            return await v2_models.model_ready(classifier, request.name, self.state.experiment.weights)

        return service_pb2.ModelReadyResponse(
            ready=await self._about_model(context, request.name, request.version, ready)
        )

    @requires("classify")
    async def ModelInfer(self, request, context):
        start = time.perf_counter()
        state = self.state
        metadata = dict(context.invocation_metadata() or ())
        sent = metadata.get("x-request-id", "")
        ours = sent.isascii() and CLIENT_ID.fullmatch(sent.encode())
        call = SimpleNamespace(rid=sent if ours else new_request_id(), model="", arm="", key_id=ANONYMOUS)
        status = 500
        state.metrics.in_flight.inc()
        try:
            with (
                self._authorize(context, "classify") as call.key_id,
                tracing.request_span("grpc ModelInfer", metadata, model=request.model_name),
            ):
                response = await self._infer(request, metadata, call, start)
            status = 200
            return response
        except GatewayError as exc:
            status = exc.status_code
            await self._abort(context, exc)
        except asyncio.CancelledError:
            status = 499  # the client went away (nginx's code for it; never sent to anyone)
            raise
        except grpc.aio.AbortError:  # raised by abort() to end the call: already counted
            raise
        except Exception:
            log.exception("unhandled error in gRPC request %s", call.rid)
            state.metrics.errors.labels("internal").inc()
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; quote the request id when reporting it")
        finally:
            state.metrics.in_flight.dec()
            labels = (ROUTE, call.model, call.arm, str(status))
            state.metrics.request_seconds.labels(*labels).observe(time.perf_counter() - start)
            state.metrics.requests.labels(*labels).inc()

    async def _infer(self, request, metadata: dict, call, start: float) -> service_pb2.ModelInferResponse:
        state = self.state
        classifier = state.classifier
        # The message's own fields were counted on the wire (KeyInterceptor); its tensors' parameters are nested.
        for tensor in (*request.inputs, *request.outputs):
            if len(tensor.parameters) > v2_tensors.MAX_PARAMETERS:
                raise BadRequest(
                    f"at most {v2_tensors.MAX_PARAMETERS} parameters per tensor, got {len(tensor.parameters)}"
                )
        v2_models.check_version(classifier, request.model_name, request.model_version or None)
        requested = [
            v2_tensors.requested_output(o.name, {k: _plain(v) for k, v in o.parameters.items()}, True)
            for o in request.outputs
        ]
        inputs = v2_tensors.read_inputs(
            _tensors(request), classifier.preprocessing.image_size, state.settings.max_images
        )
        done = await classify_request(
            state,
            call,
            request.model_name,
            files=inputs.files,
            pixels=inputs.pixels,
            sticky_key=metadata.get(state.experiment.sticky_header.lower()),
            started=start,
        )
        if done.shadow is not None:
            _background(done.shadow())
        outputs = v2_tensors.output_tensors(done.outcome.probabilities, classifier.class_names, requested)
        return service_pb2.ModelInferResponse(
            model_name=request.model_name,
            model_version=v2_models.model_version(done.outcome.version),
            id=request.id,
            parameters={k: _parameter(v) for k, v in describe(done.outcome, done.arm, call.rid).items()},
            outputs=[
                service_pb2.ModelInferResponse.InferOutputTensor(name=t.name, datatype=t.datatype, shape=t.shape)
                for t in outputs
            ],
            raw_output_contents=[
                v2_tensors.join_bytes(t.values) if t.datatype == "BYTES" else np.ascontiguousarray(t.values).tobytes()
                for t in outputs
            ],
        )


_BACKGROUND: set[asyncio.Task] = set()  # strong references: the loop keeps only weak ones


def _background(work) -> None:
    task = asyncio.get_running_loop().create_task(work)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)
