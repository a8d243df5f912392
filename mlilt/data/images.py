"""Images for the image tower: references, content ids, checks and decoding to RGB.

An image reaches mlilt either as a file on disk (JSONL/CSV captions, path columns) or as
encoded bytes held in memory (the Hugging Face ``Image`` feature). :class:`ImageRef` covers
both so that the rest of the code never needs to know which one it holds.

Every failure to read or decode becomes a :class:`~mlilt.errors.DataError` that names the
file (and the caption line, when the caller knows it): a user with 50,000 photos needs to
know *which* one is broken, not a PIL traceback.
"""
from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from mlilt.errors import DataError

# The same ceiling PIL uses by default (~89.5M pixels, a 0.25 GB RGB bitmap). We check it
# ourselves instead of changing ``Image.MAX_IMAGE_PIXELS``, which is global to the process.
MAX_PIXELS = 89_478_485

# Page through files in chunks so hashing a large image never holds it twice in memory.
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class ImageRef:
    """One image: a filesystem ``path`` or encoded ``data`` bytes (exactly one of them).

    ``name`` is what messages call it: the path, or where in-memory bytes came from.
    """

    path: Path | None = None
    data: bytes | None = field(default=None, repr=False)
    name: str = ""
    # The content hash, memoised on the instance: [digest] for bytes, which never change;
    # [(stat key, digest)] for a file, reused while the file's stat key stays the same.
    _id_memo: list = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if (self.path is None) == (self.data is None):
            raise TypeError("ImageRef needs exactly one of path= or data=")
        if self.path is not None and not isinstance(self.path, Path):
            object.__setattr__(self, "path", Path(self.path))
        if not self.name:
            object.__setattr__(self, "name", str(self.path) if self.path is not None else "<bytes>")

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> "ImageRef":
        return cls(path=Path(path))

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "<bytes>") -> "ImageRef":
        return cls(data=bytes(data), name=name)

    @property
    def id(self) -> str:
        """Content hash (sha256 hex): equal images from different files share one id."""
        return image_id(self)


ImageLike = Union[ImageRef, str, os.PathLike, bytes]


def as_ref(ref: ImageLike) -> ImageRef:
    """Accept a ref, a path or raw bytes wherever an image is expected."""
    if isinstance(ref, ImageRef):
        return ref
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return ImageRef.from_bytes(bytes(ref))
    return ImageRef.from_path(ref)


def _where(ref: ImageRef, source: str | None) -> str:
    return f"{source}: image {ref.name}" if source else f"image {ref.name}"


def image_id(ref: ImageLike, source: str | None = None) -> str:
    """sha256 of the image's encoded bytes; keys the feature caches.

    The digest is memoised on the :class:`ImageRef`, so it lives as long as the ref does (a
    pair set's refs, say) and no longer. For a file it is keyed by (size, mtime_ns, ctime_ns,
    inode): asking the same ref again is one ``stat``, and an edited file gets a new id.
    """
    ref = as_ref(ref)
    memo = ref._id_memo
    if ref.data is not None:
        if not memo:
            memo.append(hashlib.sha256(ref.data).hexdigest())
        return memo[0]
    path = os.path.abspath(ref.path)
    try:
        st = os.stat(path)
        # ctime and inode change on every write and cannot be set back by a user, unlike mtime.
        key = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        if memo and memo[0][0] == key:
            return memo[0][1]
        digest = _file_sha256(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"{_where(ref, source)}: cannot read {path} ({_reason(exc)})") from None
    memo[:] = [(key, digest)]
    return digest


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    return str(exc) or type(exc).__name__


def _open(ref: ImageRef, where: str) -> Image.Image:
    """``Image.open`` with the bomb guard and every PIL failure turned into DataError."""
    if ref.path is not None and os.path.exists(ref.path) and os.path.getsize(ref.path) == 0:
        raise DataError(f"{where}: empty file (0 bytes)")
    if ref.data is not None and not ref.data:
        raise DataError(f"{where}: empty image data (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; we want an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(ref.path if ref.path is not None else io.BytesIO(ref.data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"{where}: too many pixels, refusing to decode ({exc})") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error...
        raise DataError(f"{where}: not a readable image ({_reason(exc)})") from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        image.close()
        raise DataError(
            f"{where}: {width}x{height} is more than {MAX_PIXELS:,} pixels; "
            "refusing to decode a possible decompression bomb"
        )
    return image


def verify_image(ref: ImageLike, source: str | None = None) -> None:
    """Raise DataError unless the image decodes; cheap enough to run on every row.

    ``verify()`` checks headers and (for PNG) chunk checksums, which catches truncation,
    but it does not decode JPEG data; a JPEG is therefore decoded in draft mode (1/8
    scale), which still reads the whole stream and so catches a cut-off file.
    """
    ref = as_ref(ref)
    where = _where(ref, source)
    image = _open(ref, where)
    try:
        fmt = image.format
        image.verify()
        if fmt == "JPEG":
            image = _open(ref, where)
            image.draft("RGB", (1, 1))
            image.load()
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{where}: corrupt or truncated image ({_reason(exc)})") from None
    finally:
        image.close()


def load_image(ref: ImageLike, source: str | None = None) -> Image.Image:
    """Decode to an 8-bit RGB image the tower can take, whatever the file's mode.

    EXIF orientation is applied (captions describe the photo as seen upright); alpha is
    composited on white (transparent PNG logos would otherwise turn black); 16-bit and
    float images are scaled to 8 bits rather than clipped.
    """
    ref = as_ref(ref)
    where = _where(ref, source)
    image = _open(ref, where)
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{where}: corrupt or truncated image ({_reason(exc)})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB (see :func:`load_image` for the choices)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        has_alpha = "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
        return _on_white(image) if has_alpha else image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _on_white(image.convert("RGBA"))
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_to_uint8(image)).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV: PIL converts these itself


def _on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def _to_uint8(image: Image.Image) -> np.ndarray:
    """Scale a high-bit-depth single-channel image to 0..255.

    16-bit data is divided by 257 (65535 -> 255). 32-bit integer images usually hold
    16-bit values (PIL's "I" for 16-bit PNG/TIFF), so they get the same scale unless they
    exceed it; floats in 0..1 are multiplied by 255; anything else is min-max stretched.
    """
    values = np.asarray(image).astype(np.float64)
    if values.size == 0:
        return values.astype(np.uint8)
    low, high = float(values.min()), float(values.max())
    if image.mode.startswith("I;16") or (image.mode == "I" and 255 < high <= 65535 and low >= 0):
        values = values / 257.0
    elif image.mode == "F" and low >= 0.0 and high <= 1.0:
        values = values * 255.0
    elif low < 0 or high > 255:
        values = (values - low) * (255.0 / (high - low)) if high > low else values * 0
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)
