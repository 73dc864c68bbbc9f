"""Image paths of LLaVA-format records, confined to their image root.

A record names its images as `"image": "a.jpg"` or `"image": ["a.jpg", "b.jpg"]`, relative to the
source's `image_root`. Before anything is opened, each path must stay inside the root and name a
regular file:

- `../` paths and absolute paths that leave the root are refused (`path_outside_root`);
- so are symlinks inside the root that lead outside it (after resolving every link), unless the
  source allows it with `follow_links` (a trusted folder that links to image stores elsewhere);
- FIFOs, devices and directories are refused (`not_a_file`): reading a FIFO would block the loader.

The root itself may be a symlink: it is resolved once, and paths are checked against where it leads.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

__all__ = ["ImagePathError", "ImageRoot", "record_image_paths"]


class ImagePathError(ValueError):
    """An image path that must not be read; `reason` is the skip counter's key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def record_image_paths(record: dict[str, Any]) -> list[str]:
    """The record's image paths in order: none (no `image`), one, or several."""
    image = record.get("image")
    if image is None:
        return []
    paths = [image] if isinstance(image, str) else image
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise ImagePathError(
            "malformed_record",
            f"'image' must be a path or a list of paths, got {type(image).__name__} {image!r:.60}",
        )
    return paths


class ImageRoot:
    """A folder whose files records may name; `resolve` confines a relative path to it."""

    def __init__(self, root: str | os.PathLike[str], follow_links: bool = False):
        self.root = Path(root)
        self.real = os.path.realpath(self.root)
        self.follow_links = follow_links

    def __repr__(self) -> str:
        return f"ImageRoot({str(self.root)!r}, follow_links={self.follow_links})"

    def _inside(self, path: str) -> bool:
        return path == self.real or path.startswith(self.real.rstrip(os.sep) + os.sep)

    def resolve(self, relative: str) -> str:
        """The file `relative` names under the root. Raises `ImagePathError` for a path that leaves
        the root or is not a regular file, `FileNotFoundError` for a missing one."""
        joined = os.path.normpath(os.path.join(self.real, relative))
        real = os.path.realpath(joined)
        if not self._inside(joined) or not (self.follow_links or self._inside(real)):
            raise ImagePathError(
                "path_outside_root",
                f"image path {relative!r} leads to {real}, outside image_root {self.root} (paths must stay "
                "inside it; a symlink that leaves it needs follow_links: true on the source)",
            )
        try:
            mode = os.stat(real).st_mode
        except FileNotFoundError:
            raise FileNotFoundError(
                f"image {relative!r} does not exist under image_root {self.root}"
            ) from None
        if not stat.S_ISREG(mode):
            raise ImagePathError(
                "not_a_file", f"image path {relative!r} under {self.root} is not a regular file ({real})"
            )
        return real
