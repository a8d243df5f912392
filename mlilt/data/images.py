"""Images for the image tower: references, content ids, checks and decoding to RGB.

An image reaches mlilt as a file on disk (JSONL/CSV captions, path columns), as encoded bytes
held in memory, or as encoded bytes stored elsewhere and read on demand (a member of a
WebDataset tar shard, a row of a memory-mapped Hugging Face dataset: a million of them cost
no image bytes in memory). :class:`ImageRef` covers all three so that the rest of the code
never needs to know which one it holds.

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
from typing import Protocol, Union

import numpy as np
from PIL import Image, ImageOps

from mlilt.errors import DataError

# The same ceiling PIL uses by default (~89.5M pixels, a 0.25 GB RGB bitmap). We check it
# ourselves instead of changing ``Image.MAX_IMAGE_PIXELS``, which is global to the process.
MAX_PIXELS = 89_478_485

# Page through files in chunks so hashing a large image never holds it twice in memory.
_HASH_CHUNK = 1 << 20


class StoredImage(Protocol):
    """Encoded image bytes kept elsewhere and read on demand: a member of a WebDataset tar shard
    (:class:`mlilt.data.shards.TarMember`), a cell of a memory-mapped Arrow table. Hashable and
    comparable by where the bytes are, so a pair set of a million of them holds no image bytes."""

    def read(self) -> bytes:
        """The encoded bytes (a DataError naming the place when they cannot be read)."""
        ...


@dataclass(frozen=True, init=False)
class ImageRef:
    """One image: a filesystem ``path``, encoded ``data`` bytes held in memory, or a ``stored``
    place the bytes are read from on demand (exactly one of them).

    ``name`` is what messages call it: the path, or where the bytes came from
    (``shard-000.tar:000123.jpg``, ``data.parquet row 12``).
    """

    path: Path | None
    stored: StoredImage | None
    name: str
    _bytes: bytes | None = field(repr=False)
    # The content hash, memoised on the instance: [digest] for bytes, which never change (a
    # stored image checks on each read that its container did not change); [(stat key, digest)]
    # for a file, reused while the file's stat key stays the same.
    _id_memo: list = field(compare=False, repr=False)

    def __init__(self, path: str | os.PathLike | None = None, data: bytes | None = None, name: str = "",
                 stored: StoredImage | None = None):
        if sum(value is not None for value in (path, data, stored)) != 1:
            raise TypeError("ImageRef needs exactly one of path=, data= or stored=")
        if path is not None and not isinstance(path, Path):
            path = Path(path)
        if not name:
            name = str(path) if path is not None else "<bytes>" if data is not None else repr(stored)
        for key, value in (("path", path), ("stored", stored), ("name", name), ("_bytes", data),
                           ("_id_memo", [])):
            object.__setattr__(self, key, value)

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> "ImageRef":
        return cls(path=Path(path))

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "<bytes>") -> "ImageRef":
        return cls(data=bytes(data), name=name)

    @classmethod
    def from_stored(cls, stored: StoredImage, name: str) -> "ImageRef":
        return cls(stored=stored, name=name)

    @property
    def data(self) -> bytes | None:
        """The encoded bytes when the image is not a file (``None`` for a path).

        A stored image's bytes are read from their container on each access and never kept:
        code written for in-memory images (``path is None`` -> use ``data``) works unchanged.
        """
        return self._bytes if self.stored is None else self.read_bytes()

    def read_bytes(self) -> bytes:
        """The encoded bytes, whatever kind of ref this is (a DataError when unreadable)."""
        if self._bytes is not None:
            return self._bytes
        if self.path is not None:
            try:
                return self.path.read_bytes()
            except (OSError, ValueError) as exc:
                raise DataError(f"image {self.name}: cannot read {self.path} ({_reason(exc)})") from None
        data = self.stored.read()
        if not self._id_memo:  # the bytes are here anyway: hash them now rather than read them twice
            self._id_memo.append(hashlib.sha256(data).hexdigest())
        return data

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
    if ref.path is None:
        if not memo:
            data = _read(ref, source)
            if not memo:  # a stored image's read memoises it
                memo.append(hashlib.sha256(data).hexdigest())
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


def _read(ref: ImageRef, source: str | None) -> bytes:
    """``ref.read_bytes()`` with ``source`` (the caption line) in front of any error; the error
    itself names the image (a stored image's names its container and member)."""
    try:
        return ref.read_bytes()
    except DataError as exc:
        if source is None:
            raise
        raise DataError(f"{source}: {exc}") from None


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


def _in_memory(ref: ImageRef, source: str | None) -> ImageRef:
    """A stored image's bytes read once into a transient ref (verifying a JPEG opens it twice)."""
    return ref if ref.stored is None else ImageRef.from_bytes(_read(ref, source), name=ref.name)


def _open(ref: ImageRef, where: str) -> Image.Image:
    """``Image.open`` with the bomb guard and every PIL failure turned into DataError."""
    if ref.path is not None and os.path.exists(ref.path) and os.path.getsize(ref.path) == 0:
        raise DataError(f"{where}: empty file (0 bytes)")
    data = None if ref.path is not None else ref.read_bytes()
    if data is not None and not data:
        raise DataError(f"{where}: empty image data (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; we want an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(ref.path if data is None else io.BytesIO(data))
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
    ref = _in_memory(ref, source)
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
    ref = _in_memory(ref, source)
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
