"""API keys on a real gateway: 401 without a valid key, 403 outside the key's scope, 429 past its rate
(the achieved rate within 10% of the configured one), revocation without a restart, and no key in any
log line or metric label."""

import json
import re
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from gateway.auth.gate import KeyGate
from gateway.auth.keys import ApiKey, TooManyInFlight, hash_key, new_key
from gateway.errors import GatewayError
from gateway.process import GatewayProcess, GatewayStartError
from gateway.telemetry.metrics import GatewayMetrics
from kdcontract.digits import digit_png_bytes

RATE, BURST, WINDOW_S = 20.0, 5, 10.0


def _keys() -> dict[str, tuple[str, dict]]:
    return {
        "reader": new_key("reader", ["classify"], None, None),
        "ops": new_key("ops", ["classify", "admin"], None, None),
        "metered": new_key("metered", ["classify"], RATE, None),
        "gone": new_key("gone", ["classify"], None, None),
    }


@pytest.fixture(scope="module")
def keyed(tiny_repo, triton, tmp_path_factory):
    keys = _keys()
    entries = [entry for _, entry in keys.values()]
    entries[2]["burst"] = BURST
    entries[3]["revoked"] = True
    keys_file = tmp_path_factory.mktemp("keys") / "api-keys.json"
    keys_file.write_text(json.dumps(entries))
    env = {"KDSERVE_API_KEYS_FILE": str(keys_file)}
    with GatewayProcess(tiny_repo, triton.http_url, env=env, ready_path="/readyz") as gateway:
        yield gateway, {name: key for name, (key, _) in keys.items()}, keys_file


def _classify(gateway, key: str | None, path: str = "/v1/classify?model=student"):
    headers = {"Content-Type": "image/png"} | ({"Authorization": f"Bearer {key}"} if key else {})
    return gateway.client.post(path, content=digit_png_bytes(1500), headers=headers)


def test_no_wrong_or_revoked_key_is_401_and_scopes_are_403(keyed):
    gateway, keys, _ = keyed
    for key in (None, "kds_not-a-key", keys["gone"]):
        resp = _classify(gateway, key)
        assert resp.status_code == 401, resp.text
        assert resp.json()["error"]["kind"] == "unauthorized" and resp.headers["WWW-Authenticate"].startswith("Bearer")
    v2 = gateway.client.get("/v2/models/student")
    assert v2.status_code == 401 and isinstance(v2.json()["error"], str)
    assert _classify(gateway, keys["reader"]).status_code == 200
    assert gateway.client.get("/v2/models/student", headers={"Authorization": f"Bearer {keys['reader']}"}).is_success
    experiment = gateway.client.get("/v1/experiment", headers={"Authorization": f"Bearer {keys['reader']}"}).json()
    change = gateway.client.put(
        "/v1/experiment", json=experiment["experiment"], headers={"Authorization": f"Bearer {keys['reader']}"}
    )
    assert change.status_code == 403 and "admin" in change.json()["error"]["message"]
    for open_path in ("/healthz", "/readyz", "/metrics", "/v2/health/ready", "/v2/health/live", "/"):
        assert gateway.client.get(open_path).status_code == 200, open_path

    with grpcclient.InferenceServerClient(gateway.grpc_url) as client:
        image = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
        image.set_data_from_numpy(np.array([[digit_png_bytes(1500)]], dtype=object))
        assert client.is_server_ready()  # health stays open over gRPC too
        for headers in ({}, {"authorization": "Bearer kds_wrong"}, {"authorization": f"Bearer {keys['gone']}"}):
            with pytest.raises(InferenceServerException) as refused:
                client.infer("student", [image], headers=headers)
            assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
        served = client.infer("student", [image], headers={"authorization": f"Bearer {keys['reader']}"})
        assert served.as_numpy("PROBABILITIES").shape == (1, 10)


def test_a_key_over_its_rate_gets_429_and_the_achieved_rate_is_the_configured_one(keyed):
    gateway, keys, _ = keyed
    accepted, refused, retry_after = [], [], set()
    stop = time.monotonic() + WINDOW_S
    lock = threading.Lock()

    def hammer() -> None:
        import httpx

        with httpx.Client(base_url=gateway.url, timeout=30) as client:
            while time.monotonic() < stop:
                resp = client.post(
                    "/v1/classify?model=student",
                    content=digit_png_bytes(1600),
                    headers={"Content-Type": "image/png", "Authorization": f"Bearer {keys['metered']}"},
                )
                with lock:
                    if resp.status_code == 200:
                        accepted.append(time.monotonic())
                    else:
                        assert resp.status_code == 429, resp.text
                        refused.append(resp.json()["error"]["kind"])
                        retry_after.add(resp.headers["Retry-After"])

    start = time.monotonic()
    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - start
    achieved = len(accepted) / elapsed
    print(f"rate limit: {len(accepted)} accepted, {len(refused)} refused in {elapsed:.1f}s -> {achieved:.2f}/s")
    assert refused and set(refused) == {"rate_limited"} and retry_after == {"1"}
    assert abs(achieved - RATE) <= 0.1 * RATE, achieved
    # Another key is not slowed by it.
    assert _classify(gateway, keys["reader"]).status_code == 200


def test_revoking_a_key_in_the_file_takes_effect_without_a_restart(keyed, tiny_repo):
    gateway, keys, keys_file = keyed
    entries = json.loads(keys_file.read_text())
    assert _classify(gateway, keys["ops"]).status_code == 200
    for entry in entries:
        if entry["id"] == "ops":
            entry["revoked"] = True
    keys_file.write_text(json.dumps(entries))
    deadline = time.monotonic() + 20
    while _classify(gateway, keys["ops"]).status_code != 401:
        assert time.monotonic() < deadline, "the revoked key is still accepted"
        time.sleep(0.2)
    assert _classify(gateway, keys["reader"]).status_code == 200


def test_keys_appear_in_no_log_line_and_no_metric_label(keyed):
    gateway, keys, _ = keyed
    _classify(gateway, "kds_a-wrong-key-that-must-not-be-logged")
    metrics = gateway.client.get("/metrics").text
    log = gateway.log_path.read_text()
    for secret in [*keys.values(), "kds_a-wrong-key-that-must-not-be-logged"]:
        assert secret not in metrics and secret not in log
        assert hash_key(secret) not in metrics and hash_key(secret) not in log
    labels = set(re.findall(r'kdserve_api_key_requests_total\{key="([^"]*)",outcome="([^"]*)"\}', metrics))
    assert {key for key, _ in labels} <= {"reader", "ops", "metered", "gone", "anonymous", "invalid"}
    assert ("invalid", "unauthorized") in labels and ("reader", "accepted") in labels


def test_in_flight_quota_and_configuration_errors():
    key, entry = new_key("single", ["classify"], None, 1)
    gate = KeyGate([ApiKey(**entry)], None, None, False, GatewayMetrics())
    with gate.admit(f"Bearer {key}", "classify") as held:
        assert held == "single"
        with pytest.raises(TooManyInFlight) as second, gate.admit(f"Bearer {key}", "classify"):
            pass
        assert second.value.status_code == 429 and second.value.headers["Retry-After"] == "1"
    with gate.admit(f"Bearer {key}", "classify"):  # released when the first finished
        pass
    with pytest.raises(GatewayError, match="no API key is configured"):
        KeyGate([], None, None, False, GatewayMetrics(), host="0.0.0.0")
    KeyGate([], None, None, False, GatewayMetrics(), host="127.0.0.1")  # the demo: open on loopback
    KeyGate([], None, None, True, GatewayMetrics(), host="0.0.0.0")  # said out loud


def test_a_gateway_on_a_network_address_without_keys_refuses_to_start(tiny_repo, triton):
    with pytest.raises(GatewayStartError, match="no API key is configured"):
        GatewayProcess(tiny_repo, triton.http_url, env={"KDSERVE_HOST": "0.0.0.0"})


def test_keys_new_writes_each_quota_it_is_given_and_the_entry_is_a_valid_key(tmp_path):
    import subprocess
    import sys

    made = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "keys",
            "new",
            "--id",
            "team-a",
            "--rate",
            "50",
            "--max-in-flight",
            "8",
            "--bytes-per-s",
            "1048576",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    entry = json.loads(made.stdout)
    assert (entry["rate_per_s"], entry["max_in_flight"], entry["bytes_per_s"]) == (50.0, 8, 1048576.0)
    key = re.search(r"kds_\S+", made.stderr).group(0)
    assert ApiKey(**entry).sha256 == hash_key(key) and key not in made.stdout
