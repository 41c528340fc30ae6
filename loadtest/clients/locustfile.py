"""Locust users for the kdserve gateway. Runs in its own virtualenv (.venv-locust): see pyproject.toml.

Every response body is checked, not just the status: the model that answered, one prediction per
image, a label from the model's classes. Environment (set by `python -m loadtest run`):
  KDSERVE_IMAGES_DIR   held-out PNGs and labels.json
  KDSERVE_STAGES       load shape, "seconds:users,seconds:users,..." (optional)
  KDSERVE_MAX_FAIL_RATIO  stop the test when the failure ratio passes this (default 0.01)
  KDSERVE_OUT          where accuracy.json (correct top-1 per model under load) is written
  KDSERVE_FEEDBACK_URL where ABFeedbackUser and LoopUser post labels (another replica: any one joins them)
  KDSERVE_API_KEY      the API key every user sends (Authorization: Bearer), when the gateway requires keys
  KDSERVE_LOOP_KEYS    LoopUser's clients: JSON [{"key", "share", "label_share", "poison_class"}]
  KDSERVE_USER_RPS     requests a second each LoopUser sends at most (default 20: a capture the loop can train on)
"""

from __future__ import annotations

import itertools
import json
import os
import random
from pathlib import Path

import gevent
from locust import LoadTestShape, constant_throughput, events, task
from locust.contrib.fasthttp import FastHttpUser
from locust.runners import MasterRunner, WorkerRunner

from kdcontract.names import AUTO, ENSEMBLE, STUDENT, STUDENT_KD, TEACHER, VERSION_MARK
from loadtest.clients.stages import parse_stages

IMAGES_DIR = Path(os.environ.get("KDSERVE_IMAGES_DIR", "."))
LABELS: dict[str, str] = (
    json.loads((IMAGES_DIR / "labels.json").read_text()) if IMAGES_DIR.joinpath("labels.json").exists() else {}
)
IMAGES = [(name, (IMAGES_DIR / name).read_bytes(), label) for name, label in sorted(LABELS.items())]
API_KEY = os.environ.get("KDSERVE_API_KEY", "")
LOOP_KEYS: list[dict] = json.loads(os.environ.get("KDSERVE_LOOP_KEYS", "[]"))
# The model a response may name for each `?model=` (the A/B entry: either arm).
EXPECTED_MODEL = {
    STUDENT: {STUDENT_KD},
    TEACHER: {TEACHER},
    ENSEMBLE: {ENSEMBLE},
    AUTO: {STUDENT_KD, TEACHER},
}
CORRECT: dict[str, list[int]] = {}


class ClassifyUser(FastHttpUser):
    abstract = True
    model = "student"

    def on_start(self) -> None:
        if not IMAGES:
            raise RuntimeError(f"no images in {IMAGES_DIR}; run through `python -m loadtest run`")
        self.images = itertools.cycle(random.sample(IMAGES, len(IMAGES)))
        self.client_key = f"user-{random.getrandbits(48):012x}"
        self.auth = {"Authorization": f"Bearer {API_KEY}"} if API_KEY else {}

    def next_client_key(self) -> str:
        return self.client_key

    def request_auth(self) -> dict[str, str]:
        """The Authorization header of the next request (every request the same key, but LoopUser's)."""
        return self.auth

    def answered(self, request_id: str, label: str) -> None:
        """Called with every well-formed answer (the feedback user sends the label back)."""

    @task
    def classify(self) -> None:
        _, payload, label = next(self.images)
        headers = {"Content-Type": "image/png", "X-Client-Key": self.next_client_key(), **self.request_auth()}
        with self.client.post(
            f"/v1/classify?model={self.model}&top_k=1",
            data=payload,
            headers=headers,
            name=f"classify {self.model}",
            catch_response=True,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}: {resp.text[:200]}")
                return
            try:
                body = resp.json()
                top = body["predictions"][0]["top_k"][0]
            except (ValueError, KeyError, IndexError, TypeError):
                resp.failure("response is not a classification")
                return
            if body["model"].partition(VERSION_MARK)[0] not in EXPECTED_MODEL[self.model]:  # a version: its name
                resp.failure(f"answered by {body['model']}, expected {EXPECTED_MODEL[self.model]}")
            elif len(body["predictions"]) != 1 or not 0.0 <= top["probability"] <= 1.0:
                resp.failure("malformed prediction")
            elif self.model == "auto" and body.get("arm") is None:
                resp.failure("A/B request without an arm")
            else:
                resp.success()
                self.answered(resp.headers.get("X-Request-ID", ""), label)
                tally = CORRECT.setdefault(body["model"], [0, 0])
                tally[0] += int(top["label"] == label)
                tally[1] += 1


class StudentUser(ClassifyUser):
    model = "student"


class TeacherUser(ClassifyUser):
    model = "teacher"


class EnsembleUser(ClassifyUser):
    model = "ensemble"


class ABUser(ClassifyUser):
    """Many end users behind one Locust user, each sticky to its arm: with one key per Locust user, a
    90/10 split over 4 users sends everything to one arm two times in three (0.9^4)."""

    model = "auto"
    CLIENTS = 1000

    def next_client_key(self) -> str:
        return f"client-{random.randrange(self.CLIENTS)}"


def post_labels(user: ClassifyUser, items: list[dict], headers: dict[str, str]) -> None:
    """A batch of labels to the user's KDSERVE_FEEDBACK_URL; a failure unless every item is accepted."""
    gevent.sleep(0.05)  # answers reach the shared store off the request path
    with user.client.post(user.feedback_url, json=items, headers=headers, name="feedback", catch_response=True) as resp:
        if resp.status_code != 200:
            resp.failure(f"status {resp.status_code}: {resp.text[:200]}")
            return
        refused = [r for r in resp.json()["results"] if r["status"] != 200]
        if refused:
            resp.failure(f"{len(refused)} of {len(items)} refused: {refused[0]['message']}")
        else:
            resp.success()


class ABFeedbackUser(ABUser):
    """A/B traffic whose true labels come back as feedback, in batches, to KDSERVE_FEEDBACK_URL (default:
    the same gateway); each item must be accepted (joined once to the arm that answered)."""

    BATCH = 20

    def on_start(self) -> None:
        super().on_start()
        self.pending: list[dict] = []
        self.feedback_url = os.environ.get("KDSERVE_FEEDBACK_URL", "").rstrip("/") + "/v1/feedback"

    def answered(self, request_id: str, label: str) -> None:
        self.pending.append({"request_id": request_id, "label": label})
        if len(self.pending) >= self.BATCH:
            items, self.pending = self.pending, []
            post_labels(self, items, self.auth)


class LoopUser(ABUser):
    """The loop's clients behind API keys (KDSERVE_LOOP_KEYS): each request is sent with a key drawn by its
    share, and that key labels `label_share` of its requests (only the key that made a request may); an
    honest key sends the true label, a hostile one (`poison_class`) that class for every image (the next
    class for an image of it), as a poisoner pulling every style it sees onto one answer would. Labels go in
    batches, per key, to KDSERVE_FEEDBACK_URL; each must be accepted. Paced at KDSERVE_USER_RPS requests a
    second each: traffic a capture can keep, not the most the CPU can send."""

    wait_time = constant_throughput(float(os.environ.get("KDSERVE_USER_RPS", "20")))
    BATCH = 20

    def on_start(self) -> None:
        super().on_start()
        if not LOOP_KEYS:
            raise RuntimeError("LoopUser needs KDSERVE_LOOP_KEYS")
        self.feedback_url = os.environ.get("KDSERVE_FEEDBACK_URL", "").rstrip("/") + "/v1/feedback"
        self.pending: dict[str, list[dict]] = {k["key"]: [] for k in LOOP_KEYS}
        self.classes = sorted({label for _, _, label in IMAGES})
        self.current = LOOP_KEYS[0]

    def request_auth(self) -> dict[str, str]:
        self.current = random.choices(LOOP_KEYS, weights=[k["share"] for k in LOOP_KEYS])[0]
        return {"Authorization": f"Bearer {self.current['key']}"}

    def answered(self, request_id: str, label: str) -> None:
        key = self.current
        if random.random() >= key.get("label_share", 1.0):
            return  # this request goes unlabelled (most people never say what the right answer was)
        poison = key.get("poison_class")
        if poison is not None:
            label = poison if label != poison else self.classes[(self.classes.index(label) + 1) % len(self.classes)]
        pending = self.pending[key["key"]]
        pending.append({"request_id": request_id, "label": label})
        if len(pending) < self.BATCH:
            return
        items, self.pending[key["key"]] = pending, []
        post_labels(self, items, {"Authorization": f"Bearer {key['key']}"})


STAGES = parse_stages(os.environ.get("KDSERVE_STAGES"))

if STAGES:  # Locust uses a shape class when the locustfile defines one; without stages, -u/-r/-t apply.

    class StagesShape(LoadTestShape):
        """Steps of constant load, e.g. KDSERVE_STAGES="20:1,20:2,20:4": 20 s at 1 user, then 2, then 4."""

        def tick(self):
            elapsed = self.get_run_time()
            for seconds, users in STAGES:
                if elapsed < seconds:
                    return users, users  # spawn the whole step at once
                elapsed -= seconds
            return None


@events.init.add_listener
def stop_on_failure_ratio(environment, **_kwargs) -> None:
    """Stop early when more than KDSERVE_MAX_FAIL_RATIO of requests fail: the result would be noise."""
    if isinstance(environment.runner, WorkerRunner):
        return
    limit = float(os.environ.get("KDSERVE_MAX_FAIL_RATIO", "0.01"))

    def watch() -> None:
        while True:
            gevent.sleep(1.0)
            total = environment.runner.stats.total
            if total.num_requests >= 50 and total.fail_ratio > limit:
                print(f"stopping: failure ratio {total.fail_ratio:.3f} > {limit}")
                environment.process_exit_code = 3
                environment.runner.quit()
                return

    if not isinstance(environment.runner, MasterRunner):
        gevent.spawn(watch)


@events.test_stop.add_listener
def write_accuracy(environment, **_kwargs) -> None:
    out = os.environ.get("KDSERVE_OUT")
    if out:
        accuracy = {m: {"correct": c, "total": t, "top1": c / t if t else None} for m, (c, t) in CORRECT.items()}
        Path(out, "accuracy.json").write_text(json.dumps(accuracy, indent=2) + "\n")
