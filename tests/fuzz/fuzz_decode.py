"""Coverage-guided fuzzing (Atheris, libFuzzer) of the gateway's image decoding: untrusted bytes in.

Every input must end as the model's input (uint8 [size, size, 3]) or as one of the gateway's own
errors (400 / 413 / 415); anything else is a finding: another exception (a 500), a crash, a hang past
libFuzzer's -timeout, or memory past -rss_limit_mb (a decompression bomb the header check missed).

    python tests/fuzz/fuzz_decode.py --seed CORPUS_DIR                # real pictures to start from
    python tests/fuzz/fuzz_decode.py CORPUS_DIR -runs=20000          # bounded (make test)
    python tests/fuzz/fuzz_decode.py CORPUS_DIR -max_total_time=600  # longer (make fuzz)
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import atheris

# The libraries under the decoder are imported first, uninstrumented: instrumenting NumPy, FastAPI,
# Starlette and pydantic (gateway.errors and the settings import them) took most of a bounded run's
# time and guides nothing here. What is instrumented is the code bytes reach: Pillow with every format
# plugin (`Image.init()` imports them under instrumentation; otherwise they load later, uninstrumented)
# and kdserve's own decoding and preparation.
import fastapi  # noqa: F401
import numpy as np
import pydantic_settings  # noqa: F401
import starlette.exceptions  # noqa: F401

with atheris.instrument_imports(include=["PIL", "gateway", "kdcontract"]):
    from PIL import Image

    Image.init()
    from gateway.errors import GatewayError
    from gateway.serving.images import decode_image
    from gateway.settings import GatewaySettings
    from kdcontract.manifest import DigitFraming, Preprocessing

SPECS = [  # digits framing (polarity, ink box) and plain resizing take different paths
    Preprocessing(image_size=8, mean=[0.0] * 3, std=[1.0] * 3, digit=DigitFraming()),
    Preprocessing(image_size=32, mean=[0.0] * 3, std=[1.0] * 3),
]
DEFAULTS = GatewaySettings.model_fields
ALLOWED = DEFAULTS["allowed_formats"].default
MAX_PIXELS = DEFAULTS["max_image_pixels"].default


def test_one_input(data: bytes) -> None:
    spec = SPECS[data[0] % 2] if data else SPECS[0]
    try:
        pixels = decode_image(data, spec, ALLOWED, MAX_PIXELS)
    except GatewayError:
        return
    if pixels.dtype != np.uint8 or pixels.shape != (spec.image_size, spec.image_size, 3):
        raise AssertionError(f"decoded to {pixels.dtype} {pixels.shape}")


def seed_corpus(folder: Path) -> None:
    """Real digits as clients send them, in every allowed format and several modes."""
    from PIL import Image

    from kdcontract.client_forms import ClientForm, render
    from kdcontract.digits import digits_gray

    folder.mkdir(parents=True, exist_ok=True)
    digit = digits_gray()[0][1700]
    for i, form in enumerate([ClientForm(size=8), ClientForm(size=64, encoding="JPEG"), ClientForm(size=32)]):
        (folder / f"form{i}").write_bytes(render(digit, form))
    picture = Image.fromarray(digit).resize((24, 24))
    for fmt, mode in [("GIF", "P"), ("BMP", "RGB"), ("TIFF", "L"), ("WEBP", "RGB"), ("PNG", "RGBA"), ("PNG", "I;16")]:
        buf = io.BytesIO()
        picture.convert(mode).save(buf, format=fmt)
        (folder / f"{fmt}-{mode.replace(';', '')}").write_bytes(buf.getvalue())


if __name__ == "__main__":
    if sys.argv[1:2] == ["--seed"]:
        seed_corpus(Path(sys.argv[2]))
    else:
        atheris.Setup(sys.argv, test_one_input)
        atheris.Fuzz()
