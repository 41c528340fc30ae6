"""The Open Inference Protocol (v2) over REST on the gateway: tritonclient.http classifies real digits
with the same answers as /v1/classify, and hostile v2 bodies get 4xx."""

import json
import struct

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from kdcontract.digits import digit_png_bytes, digits_test_indices
from kdcontract.manifest import read_manifest
from training.data import load_digits_images

HELD_OUT = [1500, 1600, 1700, 1750, 1790]  # indices into sklearn's digits
MODELS = ("student", "teacher", "ensemble", "cascade", "student_kd")


BATCH = 64  # the gateway's default images per request


def batches(indices) -> list[list[int]]:
    return [list(indices[i : i + BATCH]) for i in range(0, len(indices), BATCH)]


def held_out_indices(repo) -> list[int]:
    """Every held-out test digit of the repository's split (indices into sklearn's digits)."""
    return digits_test_indices(read_manifest(repo).split).tolist()


def v1_probabilities(gateway, model: str, indices: list[int]) -> np.ndarray:
    rows = []
    for batch in batches(indices):
        files = [("images", (f"{i}.png", digit_png_bytes(i), "image/png")) for i in batch]
        resp = gateway.client.post("/v1/classify", params={"model": model, "top_k": 10}, files=files)
        assert resp.status_code == 200, resp.text
        for prediction in resp.json()["predictions"]:
            row = np.zeros(10)
            for label in prediction["top_k"]:
                row[label["index"]] = label["probability"]
            rows.append(row)
    return np.array(rows)


def image_input(indices: list[int], binary: bool) -> httpclient.InferInput:
    tensor = httpclient.InferInput("IMAGE", [len(indices), 1], "BYTES")
    data = np.array([[digit_png_bytes(i)] for i in indices], dtype=object)
    if binary:
        tensor.set_data_from_numpy(data, binary_data=True)
    else:  # JSON: each element is the image's base64 text
        import base64

        tensor.set_data_from_numpy(
            np.array([[base64.b64encode(d).decode()] for d in data[:, 0]], dtype=object), binary_data=False
        )
    return tensor


@pytest.fixture(scope="module")
def client(gateway):
    with httpclient.InferenceServerClient(gateway.url.removeprefix("http://")) as c:
        yield c


def test_tritonclient_http_classifies_every_held_out_digit_like_v1_for_every_gateway_model(gateway, client, tiny_repo):
    assert client.is_server_live() and client.is_server_ready()
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    indices = held_out_indices(tiny_repo)
    assert len(indices) >= 100
    for model in MODELS:
        assert client.is_model_ready(model), model
        meta = client.get_model_metadata(model)
        assert meta["inputs"][0] == {"name": "IMAGE", "datatype": "BYTES", "shape": [-1, 1]}
        assert meta["outputs"][0]["shape"] == [-1, 10]
        expected = v1_probabilities(gateway, model, indices)
        served = np.concatenate(
            [
                client.infer(
                    model,
                    [image_input(batch, binary=True)],
                    outputs=[httpclient.InferRequestedOutput("PROBABILITIES", binary_data=True)],
                ).as_numpy("PROBABILITIES")
                for batch in batches(indices)
            ]
        )
        assert served.dtype == np.float32 and served.shape == (len(indices), 10)
        # Same probabilities (float32 on the wire), hence the same answer for every digit; the cascade
        # too, since the same student and teacher answer the same images.
        np.testing.assert_allclose(served, expected, atol=1e-5)
        assert (served.argmax(-1) == expected.argmax(-1)).all(), model
        # JSON tensors (base64 images in, numbers out) give the same answers as binary ones.
        result = client.infer(
            model,
            [image_input(HELD_OUT, binary=False)],
            outputs=[httpclient.InferRequestedOutput("PROBABILITIES", binary_data=False)],
            request_id=f"r-{model}",
        )
        np.testing.assert_allclose(
            result.as_numpy("PROBABILITIES"), v1_probabilities(gateway, model, HELD_OUT), atol=1e-5
        )
        response = result.get_response()
        assert response["id"] == f"r-{model}" and response["parameters"]["request_id"]
    cascade = client.infer("cascade", [image_input(HELD_OUT, True)]).get_response()
    assert set(cascade["parameters"]["answered_by"].split(",")) <= {"student_kd", "teacher"}


def test_prepared_pixels_and_the_classification_extension(gateway, client):
    pixels = load_digits_images(8)[0].numpy()[HELD_OUT]  # uint8 [N, 8, 8, 3], as the gateway prepares them
    tensor = httpclient.InferInput("PIXELS", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    ranked = httpclient.InferRequestedOutput("PROBABILITIES", class_count=3)
    result = client.infer("student", [tensor], outputs=[ranked])
    top = result.as_numpy("PROBABILITIES")
    assert top.shape == (len(HELD_OUT), 3)
    expected = v1_probabilities(gateway, "student", HELD_OUT)
    for row, probs in zip(top, expected, strict=True):
        first_probability, first_index, first_label = row[0].decode().split(":")
        assert int(first_index) == probs.argmax() and first_label == str(probs.argmax())
        assert abs(float(first_probability) - probs.max()) < 1e-5
        assert [float(item.decode().split(":")[0]) for item in row] == sorted(
            (float(item.decode().split(":")[0]) for item in row), reverse=True
        )


def test_versions_unknown_models_and_the_ab_entry(gateway, client):
    assert client.get_model_metadata("student_kd", "1")["versions"] == ["1"]
    with pytest.raises(InferenceServerException, match="no version '7'"):
        client.get_model_metadata("student_kd", "7")
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_metadata("resnet_9000")
    result = client.infer("auto", [image_input(HELD_OUT[:1], True)], headers={"X-Client-Key": "user-1"})
    assert result.get_response()["parameters"]["arm"] in {"student", "teacher"}
    config = client.get_model_config("ensemble")
    assert config["max_batch_size"] >= 1 and config["input"][0]["data_type"] == "TYPE_STRING"


def _post(gateway, model: str, header: dict, binary: bytes = b"", declared: int | None = None):
    body = json.dumps(header).encode()
    headers = {"Content-Type": "application/octet-stream" if binary else "application/json"}
    if binary or declared is not None:
        headers["Inference-Header-Content-Length"] = str(len(body) if declared is None else declared)
    return gateway.client.post(f"/v2/models/{model}/infer", content=body + binary, headers=headers)


def _image(shape, datatype="BYTES", **extra):
    return {"inputs": [{"name": "IMAGE", "shape": shape, "datatype": datatype, **extra}]}


def test_hostile_v2_bodies_get_4xx_with_the_protocols_error_body(gateway):
    png = digit_png_bytes(HELD_OUT[0])
    element = struct.pack("<I", len(png)) + png
    cases = {
        "wrong datatype": (_image([1, 1], "FP32", data=[1.0]), b"", None, 400),
        "shape larger than the data": (
            _image([2, 1], parameters={"binary_data_size": len(element)}),
            element,
            None,
            400,
        ),
        "length prefix past the end": (
            _image([1, 1], parameters={"binary_data_size": 8}),
            struct.pack("<I", 10**9) + b"abcd",
            None,
            400,
        ),
        "binary size past the body": (_image([1, 1], parameters={"binary_data_size": 10**6}), element, None, 400),
        "header length past the body": (_image([1, 1]), b"", 10**6, 400),
        "huge declared shape": (_image([2**62, 2**62], data=[]), b"", None, 400),
        "negative dimension": (_image([-1, 1], data=[]), b"", None, 400),
        "pixels of the wrong size": (
            {"inputs": [{"name": "PIXELS", "shape": [1, 9, 9, 3], "datatype": "UINT8", "data": [0] * 243}]},
            b"",
            None,
            400,
        ),
        "pixel value out of range": (
            {"inputs": [{"name": "PIXELS", "shape": [1, 8, 8, 3], "datatype": "UINT8", "data": [256] * 192}]},
            b"",
            None,
            400,
        ),
        "two inputs": ({"inputs": _image([1])["inputs"] * 2}, b"", None, 400),
        "unknown output": (_image([1], data=["aGk="]) | {"outputs": [{"name": "logits"}]}, b"", None, 400),
        "not an image": (_image([1], data=["aGk="]), b"", None, 415),
        "too many images": (_image([65], data=["aGk="] * 65), b"", None, 400),
    }
    for what, (header, binary, declared, status) in cases.items():
        resp = _post(gateway, "student", header, binary, declared)
        assert resp.status_code == status, (what, resp.status_code, resp.text)
        assert isinstance(resp.json()["error"], str) and resp.json()["error"], what
    assert _post(gateway, "no_such_model", _image([1], data=["aGk="])).status_code == 404
    broken = gateway.client.post(
        "/v2/models/student/infer", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert broken.status_code == 400 and "JSON" in broken.json()["error"]
    gz = gateway.client.post("/v2/models/student/infer", content=b"\x1f\x8b", headers={"Content-Encoding": "gzip"})
    assert gz.status_code == 415
