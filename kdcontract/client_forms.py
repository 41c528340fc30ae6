"""Pictures of a digit as clients really send them (Pillow and NumPy only, no torch).

scikit-learn's digits are 8x8 counts of ink in 4x4 blocks of 32x32 bitmaps: light ink on black,
the digit's height filling the box. Clients send something else: the same digit upscaled by a
browser or a phone (any size, any resampling filter), as PNG or JPEG, grey or RGB, often dark ink on
white, sometimes small or off-centre on a larger canvas. `render` makes those pictures from an 8x8
digit; training draws random forms from them (so the model learns what serving will see) and the
served-accuracy check sends a fixed list of them through the real gateway.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class ClientForm:
    """How a client turns a digit into a file."""

    size: int = 8  # side of the picture sent, in pixels
    resample: str = "nearest"  # filter of the client's upscale
    encoding: str = "PNG"  # PNG | JPEG
    color: str = "L"  # L (grey) | RGB
    dark_on_light: bool = False  # ink darker than the paper (pen on paper, most drawing canvases)
    digit_fraction: float = 1.0  # the digit's height as a share of the picture's side (< 1: on a canvas)
    offset: tuple[float, float] = (0.0, 0.0)  # where on the canvas, as a share of the free space (-1..1)
    blur: float = 0.0  # Gaussian blur radius in output pixels (focus, motion, a soft brush)
    jpeg_quality: int = 85

    @property
    def label(self) -> str:
        parts = [f"{self.size}px"]
        if self.size != 8:
            parts.append(self.resample)
        parts += [self.encoding, "grey" if self.color == "L" else "RGB"]
        if self.dark_on_light:
            parts.append("dark on light")
        if self.digit_fraction < 1:
            parts.append(f"digit {self.digit_fraction:.0%} of the canvas")
        if self.blur:
            parts.append(f"blur {self.blur:g}")
        return ", ".join(parts)


def render_image(digit: np.ndarray, form: ClientForm) -> Image.Image:
    """An 8x8 uint8 digit (light ink on black) -> the picture a client with `form` would have."""
    inner = max(1, round(form.size * form.digit_fraction))
    image = Image.fromarray(np.ascontiguousarray(digit), mode="L").resize((inner, inner), FILTERS[form.resample])
    if inner != form.size:
        canvas = Image.new("L", (form.size, form.size), 0)
        free = form.size - inner
        left = round(free / 2 * (1 + form.offset[0]))
        top = round(free / 2 * (1 + form.offset[1]))
        canvas.paste(image, (left, top))
        image = canvas
    if form.blur:
        image = image.filter(ImageFilter.GaussianBlur(form.blur))
    if form.dark_on_light:
        image = Image.eval(image, lambda v: 255 - v)
    return image.convert(form.color)


def encode(image: Image.Image, form: ClientForm) -> bytes:
    buf = io.BytesIO()
    if form.encoding == "JPEG":
        image.save(buf, format="JPEG", quality=form.jpeg_quality)
    else:
        image.save(buf, format=form.encoding)
    return buf.getvalue()


def render(digit: np.ndarray, form: ClientForm) -> bytes:
    """The file a client with `form` would upload for this digit."""
    return encode(render_image(digit, form), form)


def random_form(rng: np.random.Generator) -> ClientForm:
    """A client picked at random, for training: most pictures are large, half are dark ink on light, a
    third are JPEG, a third show the digit small or off-centre on a canvas, some are soft."""
    size = 8 if rng.random() < 0.1 else int(np.rint(np.exp(rng.uniform(np.log(12), np.log(256)))))
    on_canvas = size >= 16 and rng.random() < 0.35
    return ClientForm(
        size=size,
        resample=str(rng.choice(list(FILTERS))),
        encoding="JPEG" if rng.random() < 0.35 else "PNG",
        color="RGB" if rng.random() < 0.5 else "L",
        dark_on_light=bool(rng.random() < 0.5),
        digit_fraction=float(rng.uniform(0.3, 0.95)) if on_canvas else 1.0,
        offset=(float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1))),
        blur=float(rng.uniform(0.2, 0.04 * size)) if size >= 16 and rng.random() < 0.3 else 0.0,
        jpeg_quality=int(rng.integers(50, 96)),
    )


# The forms the served-accuracy check sends: every size from 8 to 256 px, every upscale filter, PNG
# and JPEG, grey and RGB, both polarities, and digits drawn small or off-centre on a larger canvas.
SERVED_FORMS: tuple[ClientForm, ...] = (
    ClientForm(),
    ClientForm(dark_on_light=True),
    ClientForm(size=16, resample="bilinear"),
    ClientForm(size=32, resample="nearest"),
    ClientForm(size=32, resample="bicubic", color="RGB", dark_on_light=True),
    ClientForm(size=64, resample="bilinear"),
    ClientForm(size=64, resample="lanczos", encoding="JPEG"),
    ClientForm(size=128, resample="bicubic", dark_on_light=True),
    ClientForm(size=128, resample="nearest", encoding="JPEG", color="RGB"),
    ClientForm(size=256, resample="lanczos", dark_on_light=True, encoding="JPEG"),
    ClientForm(size=256, resample="bilinear", color="RGB"),
    ClientForm(size=256, resample="bicubic", digit_fraction=0.4, offset=(-0.6, 0.5), dark_on_light=True),
    ClientForm(size=200, resample="bilinear", digit_fraction=0.6, offset=(0.8, -0.8), encoding="JPEG", blur=2.0),
)
