"""`python -m loadtest served-accuracy`: the held-out digits through the real gateway in every client form.

Accuracy measured offline is only worth something if it is the accuracy served for the pictures
clients really send. This sends the whole held-out split, once per form of `SERVED_FORMS` (sizes 8 to
256 px, every upscale filter, PNG and JPEG, grey and RGB, both polarities, digits small or off-centre
on a canvas), to the student, the teacher and the fused ensemble, and tabulates top-1 per form.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np

from kdcontract.client_forms import SERVED_FORMS, ClientForm, render
from kdcontract.digits import digits_gray, held_out_indices
from kdcontract.manifest import DataSplit
from kdcontract.names import ENSEMBLE, STUDENT, TEACHER
from kdcontract.tables import markdown_table

MODELS = (STUDENT, TEACHER, ENSEMBLE)


def served_split(client: httpx.Client) -> DataSplit | None:
    """The data split of the models the gateway at `client` serves."""
    split = client.get("/v1/models").json().get("split")
    return DataSplit.model_validate(split) if split else None


def held_out(split: DataSplit | None) -> tuple[np.ndarray, np.ndarray]:
    """The 8x8 digits and labels of `split`'s held-out test split."""
    images, labels = digits_gray()
    indices = held_out_indices(split)
    return images[indices], labels[indices]


def top1_through_gateway(
    client: httpx.Client, model: str, form: ClientForm, digits: np.ndarray, labels: np.ndarray, batch: int = 32
) -> float:
    """Top-1 of `model` over every digit sent in `form`, `batch` files a multipart request."""
    correct = 0
    for start in range(0, len(digits), batch):
        files = [
            ("images", (f"{i}.{form.encoding.lower()}", render(d, form), f"image/{form.encoding.lower()}"))
            for i, d in enumerate(digits[start : start + batch])
        ]
        resp = client.post("/v1/classify", params={"model": model, "top_k": 1}, files=files)
        if resp.status_code != 200:
            raise RuntimeError(f"{model} / {form.label}: HTTP {resp.status_code}: {resp.text[:300]}")
        predicted = [int(p["top_k"][0]["label"]) for p in resp.json()["predictions"]]
        correct += int((np.asarray(predicted) == labels[start : start + batch]).sum())
    return correct / len(digits)


def served_accuracy(client: httpx.Client, forms=SERVED_FORMS, models=MODELS) -> dict:
    digits, labels = held_out(served_split(client))
    table = {form.label: {m: top1_through_gateway(client, m, form, digits, labels) for m in models} for form in forms}
    native = table[forms[0].label]
    worst = {m: min(row[m] for row in table.values()) for m in models}
    return {
        "images": len(digits),
        "forms": table,
        "native": native,
        "worst": worst,
        "largest_drop_points": {m: round(100 * (native[m] - worst[m]), 2) for m in models},
    }


def markdown(results: dict) -> str:
    models = list(results["native"])
    lines = [
        f"Top-1 on the {results['images']} held-out test digits, sent through the gateway in each form "
        "(`python -m loadtest served-accuracy`).",
        "",
    ]
    rows = [[label, *(f"{100 * row[m]:.2f}%" for m in models)] for label, row in results["forms"].items()]
    rows.append(["**largest drop from native 8x8**", *(f"{results['largest_drop_points'][m]:.2f} pt" for m in models)])
    lines.append(markdown_table(["the same held-out digits, sent as", *models], rows))
    return "\n".join(lines) + "\n"


def write(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
