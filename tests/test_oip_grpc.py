"""The Open Inference Protocol (v2) over gRPC on the gateway's own port: tritonclient.grpc classifies
real digits with the same answers as /v1/classify; errors come back as gRPC status codes."""

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from kdcontract.digits import digit_png_bytes
from tests.test_oip_rest import HELD_OUT, MODELS, batches, held_out_indices, v1_probabilities
from training.data import load_digits_images


@pytest.fixture(scope="module")
def client(gateway):
    with grpcclient.InferenceServerClient(gateway.grpc_url) as c:
        yield c


def image_input(indices: list[int]) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("IMAGE", [len(indices), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[digit_png_bytes(i)] for i in indices], dtype=object))
    return tensor


def test_tritonclient_grpc_classifies_every_held_out_digit_like_v1_for_every_gateway_model(gateway, client, tiny_repo):
    assert client.is_server_live() and client.is_server_ready()
    assert "binary_tensor_data" in client.get_server_metadata().extensions
    indices = held_out_indices(tiny_repo)
    for model in MODELS:
        assert client.is_model_ready(model), model
        meta = client.get_model_metadata(model, as_json=True)
        assert meta["inputs"][0] == {"name": "IMAGE", "datatype": "BYTES", "shape": ["-1", "1"]}
        config = client.get_model_config(model, as_json=True)["config"]
        assert config["input"][0]["data_type"] == "TYPE_STRING" and int(config["max_batch_size"]) >= 1
        served = np.concatenate(
            [client.infer(model, [image_input(batch)]).as_numpy("PROBABILITIES") for batch in batches(indices)]
        )
        expected = v1_probabilities(gateway, model, indices)
        assert served.shape == (len(indices), 10)
        np.testing.assert_allclose(served, expected, atol=1e-5)
        assert (served.argmax(-1) == expected.argmax(-1)).all(), model
        response = client.infer(model, [image_input(HELD_OUT)], request_id=f"g-{model}").get_response(as_json=True)
        assert response["id"] == f"g-{model}" and response["parameters"]["request_id"]["string_param"]


def test_grpc_pixels_classification_and_errors(gateway, client):
    pixels = load_digits_images(8)[0].numpy()[HELD_OUT]
    tensor = grpcclient.InferInput("PIXELS", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    ranked = grpcclient.InferRequestedOutput("PROBABILITIES", class_count=2)
    result = client.infer("teacher", [tensor], outputs=[ranked])
    top = result.as_numpy("PROBABILITIES")
    expected = v1_probabilities(gateway, "teacher", HELD_OUT)
    assert [int(row[0].decode().split(":")[1]) for row in top] == expected.argmax(-1).tolist()

    wrong = grpcclient.InferInput("IMAGE", [1, 1], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 1), np.float32))
    with pytest.raises(InferenceServerException) as refused:
        client.infer("student", [wrong])
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT" and "BYTES" in refused.value.message()
    with pytest.raises(InferenceServerException) as unknown:
        client.infer("resnet_9000", [image_input(HELD_OUT[:1])])
    assert unknown.value.status() == "StatusCode.NOT_FOUND"
    not_an_image = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
    not_an_image.set_data_from_numpy(np.array([[b"not a png"]], dtype=object))
    with pytest.raises(InferenceServerException) as bad:
        client.infer("student", [not_an_image])
    assert bad.value.status() == "StatusCode.INVALID_ARGUMENT"
    metrics = gateway.client.get("/metrics").text
    assert 'route="grpc:ModelInfer"' in metrics and 'status="400"' in metrics


def test_hostile_grpc_requests_get_status_codes_never_internal_errors(gateway):
    """Raw gRPC requests the client library would never build: each refused with a client-side status."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    png = digit_png_bytes(HELD_OUT[0])
    element = len(png).to_bytes(4, "little") + png
    tensor = service_pb2.ModelInferRequest.InferInputTensor

    def request(**fields) -> service_pb2.ModelInferRequest:
        return service_pb2.ModelInferRequest(model_name="student", **fields)

    cases = {
        "more raw contents than inputs": request(
            inputs=[tensor(name="IMAGE", datatype="BYTES", shape=[1, 1])], raw_input_contents=[element, element]
        ),
        "a length prefix past the end": request(
            inputs=[tensor(name="IMAGE", datatype="BYTES", shape=[1, 1])],
            raw_input_contents=[(10**9).to_bytes(4, "little") + b"abc"],
        ),
        "shape larger than the data": request(
            inputs=[tensor(name="IMAGE", datatype="BYTES", shape=[3, 1])], raw_input_contents=[element]
        ),
        "a huge declared shape": request(
            inputs=[tensor(name="PIXELS", datatype="UINT8", shape=[2**40, 8, 8, 3])], raw_input_contents=[b"\0" * 192]
        ),
        "pixels of the wrong size": request(
            inputs=[tensor(name="PIXELS", datatype="UINT8", shape=[1, 8, 8, 3])], raw_input_contents=[b"\0" * 100]
        ),
        "no input": request(),
        "an unknown version": service_pb2.ModelInferRequest(
            model_name="student_kd",
            model_version="99",
            inputs=[tensor(name="IMAGE", datatype="BYTES", shape=[1, 1])],
            raw_input_contents=[element],
        ),
    }
    expected = {"an unknown version": grpc.StatusCode.NOT_FOUND}
    with grpc.insecure_channel(gateway.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for what, hostile in cases.items():
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(hostile, timeout=30)
            assert refused.value.code() == expected.get(what, grpc.StatusCode.INVALID_ARGUMENT), what
            assert refused.value.details(), what
        oversized = request(
            inputs=[tensor(name="IMAGE", datatype="BYTES", shape=[1, 1])], raw_input_contents=[b"\0" * (9 * 2**20)]
        )
        with pytest.raises(grpc.RpcError) as too_big:
            stub.ModelInfer(oversized, timeout=30)
        assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # past KDSERVE_MAX_BODY_BYTES
        # Still serving.
        served = stub.ModelInfer(
            request(inputs=[tensor(name="IMAGE", datatype="BYTES", shape=[1, 1])], raw_input_contents=[element]),
            timeout=30,
        )
        assert served.outputs[0].name == "PROBABILITIES"
