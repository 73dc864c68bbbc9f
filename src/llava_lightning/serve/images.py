"""Where a request's image may come from, and how big it may be.

- `data:image/...;base64,...` URLs: always (the client sends the bytes).
- Local files (`file://` URLs or absolute paths): only under the directory the operator names
  (`--allowed_image_dir`), after resolving symlinks and `..`; refused when none is named.
- `http(s)://` URLs: refused unless the operator allows them (`--allow_remote_images`); then fetched with
  a timeout and the byte limit, without following redirects to other schemes.

Every image is refused above `max_bytes` (encoded) or `max_pixels` (width x height, checked from the header
before the pixels are decoded: a small file can still be a decompression bomb).
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .errors import ApiError


@dataclass
class ImagePolicy:
    """The operator's rules for images in requests."""

    allowed_dir: Path | None = None
    """Local image files are read only under this directory (None: never)."""
    allow_remote: bool = False
    """Fetch `http(s)://` image URLs (off: refused)."""
    max_bytes: int = 10 * 2**20
    """Most bytes of one encoded image."""
    max_pixels: int = 4096 * 4096
    """Most pixels (width x height) of one image."""
    fetch_timeout: float = 10.0
    """Seconds to wait for a remote image."""


def load_image(url: str, policy: ImagePolicy, param: str = "messages") -> Image.Image:
    """The RGB image `url` names, or an `ApiError` saying why not."""
    if not isinstance(url, str) or not url:
        raise ApiError(400, "image_url.url must be a non-empty string", "invalid_image_url", param)
    scheme = url.split(":", 1)[0].lower() if ":" in url[:12] else ""
    if scheme == "data":
        data = _from_data_url(url, policy, param)
    elif scheme in ("http", "https"):
        data = _from_remote(url, policy, param)
    elif scheme == "file" or url.startswith("/"):
        data = _from_local(url, policy, param)
    else:
        raise ApiError(
            400,
            f"unsupported image URL {url[:40]!r}: send a base64 data URL (data:image/png;base64,...)",
            "invalid_image_url",
            param,
        )
    return open_image(data, policy, param)


def open_image(data: bytes, policy: ImagePolicy, param: str = "messages") -> Image.Image:
    """Decode `data` as an image within the policy's limits."""
    if len(data) > policy.max_bytes:
        raise ApiError(
            413,
            f"image of {len(data)} bytes exceeds the limit of {policy.max_bytes} bytes",
            "image_too_large",
            param,
        )
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size  # from the header: nothing decoded yet
        if width * height > policy.max_pixels:
            raise ApiError(
                413,
                f"image of {width}x{height} pixels exceeds the limit of {policy.max_pixels} pixels",
                "image_too_large",
                param,
            )
        return image.convert("RGB")
    except ApiError:
        raise
    except Exception as err:  # noqa: BLE001 (PIL raises many kinds for a bad file)
        raise ApiError(
            400, f"not a readable image ({type(err).__name__}: {err})", "invalid_image", param
        ) from err


def _from_data_url(url: str, policy: ImagePolicy, param: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise ApiError(
            400, "a data URL image must be base64: data:image/png;base64,...", "invalid_image_url", param
        )
    if len(payload) * 3 // 4 > policy.max_bytes + 3:  # refuse before decoding
        raise ApiError(413, f"image exceeds the limit of {policy.max_bytes} bytes", "image_too_large", param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ApiError(400, f"the data URL is not valid base64 ({err})", "invalid_image_url", param) from err


def _from_local(url: str, policy: ImagePolicy, param: str) -> bytes:
    if policy.allowed_dir is None:
        raise ApiError(
            403,
            "local image paths are disabled on this server (the operator enables them with --allowed_image_dir); "
            "send the image as a base64 data URL",
            "local_images_disabled",
            param,
        )
    raw = urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith("file:") else url
    root = policy.allowed_dir.resolve()
    path = Path(raw).resolve()  # symlinks and `..` resolved before the check
    if not path.is_relative_to(root):
        raise ApiError(
            403, f"image path {raw!r} is outside the allowed image directory", "path_not_allowed", param
        )
    if not path.is_file():
        raise ApiError(400, f"image file {raw!r} not found", "image_not_found", param)
    if path.stat().st_size > policy.max_bytes:
        raise ApiError(
            413, f"image file {raw!r} exceeds the limit of {policy.max_bytes} bytes", "image_too_large", param
        )
    return path.read_bytes()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102
        if urllib.parse.urlparse(newurl).scheme not in ("http", "https"):
            return None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _from_remote(url: str, policy: ImagePolicy, param: str) -> bytes:
    if not policy.allow_remote:
        raise ApiError(
            403,
            "remote image URLs are disabled on this server (the operator enables them with "
            "--allow_remote_images); send the image as a base64 data URL",
            "remote_images_disabled",
            param,
        )
    opener = urllib.request.build_opener(_NoRedirect())
    try:
        with opener.open(url, timeout=policy.fetch_timeout) as response:
            data = response.read(policy.max_bytes + 1)
    except Exception as err:  # noqa: BLE001 (URLError, timeouts, HTTP errors)
        raise ApiError(400, f"could not fetch image {url!r} ({err})", "image_fetch_failed", param) from err
    if len(data) > policy.max_bytes:
        raise ApiError(
            413, f"image at {url!r} exceeds the limit of {policy.max_bytes} bytes", "image_too_large", param
        )
    return data
