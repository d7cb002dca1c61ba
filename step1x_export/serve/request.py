"""One edit request: the form fields of `POST /v1/edits`, checked, with errors that name the field."""

from __future__ import annotations

import io
import secrets
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from PIL import Image, UnidentifiedImageError

from ..step1x_ref.imaging import ImageInputError, ImageTooLargeError, check_size, to_rgb
from ..validate import CFG_RANGE, MAX_PIXELS, SEED_RANGE, STEPS_RANGE, InputError, check_float, check_int

MAX_TEXT = 4000  # characters of instruction / negative prompt: the MLLM reads far fewer tokens anyway
N = TypeVar("N", int, float)
FIELDS = ("image", "instruction", "seed", "steps", "cfg", "size_level", "negative_prompt", "timeout_s",
          "think", "reflect", "judge_retries", "stream")  # the last four: reasoned.parse_reasoning, app.wants_stream


class RequestError(Exception):
    """A client mistake: answered as JSON with `status`, never with a traceback."""

    def __init__(self, status: int, code: str, message: str, *, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after

    def body(self) -> dict[str, str]:
        return {"error": self.code, "message": self.message}


def bad_request(message: str) -> RequestError:
    return RequestError(400, "bad_request", message)


@dataclass(frozen=True)
class EditParams:
    """Everything an edit needs besides the image; `seed` is always set (drawn when the client gave none)."""

    instruction: str
    seed: int
    steps: int
    cfg: float
    size_level: int
    negative_prompt: str = ""
    timeout_s: float | None = None  # the client's own deadline, if shorter than the server's

    def as_dict(self) -> dict[str, object]:
        return {"instruction": self.instruction, "seed": self.seed, "steps": self.steps, "cfg": self.cfg,
                "size_level": self.size_level, "negative_prompt": self.negative_prompt}


@dataclass
class EditRequest:
    image: Image.Image
    params: EditParams
    warnings: list[str] = field(default_factory=list)  # lossy conversions of the input (alpha dropped, 16-bit)


@dataclass(frozen=True)
class ParamRules:
    """The server's ranges and defaults for the optional fields."""

    max_steps: int
    min_size_level: int
    max_size_level: int
    default_size_level: int
    default_steps: int = 28
    default_cfg: float = 6.0
    min_cfg: float = CFG_RANGE[0]
    max_cfg: float = CFG_RANGE[1]
    max_pixels: int = MAX_PIXELS
    timeout_s: float = 300.0


def _number_field(form: Mapping[str, object], name: str, kind: type[N], lo: N, hi: N, default: N | None) -> N | None:
    """An optional int or float field within [lo, hi] (the shared input rules); empty or absent is `default`."""
    raw = form.get(name)
    if raw is None or raw == "":
        return default
    text = str(raw).strip()
    value: object = text
    for parse in (int, float):  # a number when it reads as one; the check names what was expected either way
        try:
            value = parse(text)
            break
        except ValueError:
            pass
    try:
        return kind(check_int(name, value, lo, hi) if kind is int else check_float(name, value, lo, hi))  # type: ignore[arg-type]
    except InputError as e:
        raise bad_request(str(e)) from None


def _text_field(form: Mapping[str, object], name: str, *, required: bool) -> str:
    raw = form.get(name)
    if raw is None:
        if required:
            raise bad_request(f"the form lacks the field {name!r} (it may be empty)")
        return ""
    if not isinstance(raw, str):
        raise bad_request(f"{name} must be a text field, got a file upload")
    if len(raw) > MAX_TEXT:
        raise bad_request(f"{name} is {len(raw)} characters; the limit is {MAX_TEXT}")
    return raw


def parse_params(form: Mapping[str, object], rules: ParamRules) -> EditParams:
    unknown = sorted(set(form) - set(FIELDS))
    if unknown:
        raise bad_request(f"unknown form field(s) {unknown}; the fields are {', '.join(FIELDS)}")
    seed = _number_field(form, "seed", int, *SEED_RANGE, None)
    return EditParams(
        instruction=_text_field(form, "instruction", required=True),
        seed=secrets.randbelow(2**31) if seed is None else seed,
        steps=_number_field(form, "steps", int, STEPS_RANGE[0], min(rules.max_steps, STEPS_RANGE[1]),  # type: ignore[arg-type]
                            rules.default_steps),
        cfg=_number_field(form, "cfg", float, rules.min_cfg, rules.max_cfg, rules.default_cfg),  # type: ignore[arg-type]
        size_level=_number_field(form, "size_level", int, rules.min_size_level,  # type: ignore[arg-type]
                                 rules.max_size_level, rules.default_size_level),
        negative_prompt=_text_field(form, "negative_prompt", required=False),
        timeout_s=_number_field(form, "timeout_s", float, 0.01, rules.timeout_s, rules.timeout_s),
    )


def decode_image(data: bytes, max_pixels: int, name: str = "image") -> tuple[Image.Image, list[str]]:
    """Uploaded bytes -> RGB image; 400 if unreadable or too small, 413 if over `max_pixels`."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            try:
                check_size(im, name, max_pixels)  # from the header: refuse a huge image before decoding it
            except ImageTooLargeError as e:
                raise RequestError(413, "image_too_large", str(e)) from None
            except ImageInputError as e:
                raise bad_request(str(e)) from None
            im.load()
            image = im.copy()
    except UnidentifiedImageError:
        raise bad_request(f"{name} is not an image in a format this server reads (PNG, JPEG, WebP, ...)") from None
    except (OSError, Image.DecompressionBombError, SyntaxError, ValueError) as e:
        raise bad_request(f"{name} is a damaged image ({type(e).__name__}: {e})") from None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = to_rgb(image, name)
    return image, [str(w.message) for w in caught]
