"""Read and write photos as float32 (C, H, W) tensors in [0, 1], keeping their bit depth.

PNG (8- and 16-bit), TIFF (8- and 16-bit) and JPEG (8-bit); gray or RGB, each optionally with an alpha
channel, which is returned separately so that the denoiser never sees it. ICC profiles and EXIF data
(PNG, JPEG; ICC also for TIFF) are carried through `Picture.metadata` so that a written result looks
like its input in every viewer.

Pillow reads and writes 8-bit files. It silently drops the low byte of 16-bit colour PNGs, so 16-bit
PNGs go through the small codec below (zlib + numpy); 16-bit TIFFs through tifffile (a dependency of
scikit-image), imported only when a TIFF is touched.
"""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

PNG_SUFFIXES = (".png",)
JPEG_SUFFIXES = (".jpg", ".jpeg")
TIFF_SUFFIXES = (".tif", ".tiff")
SUFFIXES = PNG_SUFFIXES + JPEG_SUFFIXES + TIFF_SUFFIXES


class ImageError(ValueError):
    """An image file that cannot be read or written as asked; the message says what is wrong."""


class Picture(NamedTuple):
    pixels: torch.Tensor              # (C, H, W) float32 in [0, 1]; C = 1 (gray) or 3 (RGB)
    bits: int                         # 8 or 16: the sample depth of the file, kept when it is written back
    alpha: torch.Tensor | None = None  # (1, H, W) float32 in [0, 1], or None
    metadata: dict | None = None      # "icc_profile" and "exif" bytes where the file had them


def _format(path: Path) -> str:
    suffix = path.suffix.lower()
    for name, suffixes in (("png", PNG_SUFFIXES), ("jpeg", JPEG_SUFFIXES), ("tiff", TIFF_SUFFIXES)):
        if suffix in suffixes:
            return name
    raise ImageError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(SUFFIXES)}")


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------

def read_image(path) -> Picture:
    """Read a PNG, JPEG or TIFF file. Raises FileNotFoundError, or ImageError saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no image file at {path}")
    kind = _format(path)
    try:
        if kind == "png" and _png_bit_depth(path) == 16:
            samples, metadata = _read_png16(path)
        elif kind == "tiff":
            samples, metadata = _read_tiff(path)
        else:
            samples, metadata = _read_pillow(path)
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, zlib.error, struct.error, EOFError) as err:
        raise ImageError(f"cannot read {path}: the file is truncated or corrupt ({err})") from err
    return _to_picture(samples, path, metadata)


def _to_picture(samples: np.ndarray, path: Path, metadata: dict) -> Picture:
    """(H, W, S) uint8/uint16 samples -> Picture; S = 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA."""
    if samples.ndim == 2:
        samples = samples[:, :, None]
    if samples.dtype == np.uint8:
        bits, scale = 8, 255.0
    elif samples.dtype == np.uint16:
        bits, scale = 16, 65535.0
    else:
        raise ImageError(f"{path}: samples of type {samples.dtype} are not supported; svnr reads 8- and 16-bit "
                         "images (convert it to 16-bit PNG or TIFF)")
    channels = samples.shape[2]
    if channels not in (1, 2, 3, 4):
        raise ImageError(f"{path}: {channels} channels per pixel are not supported; svnr reads gray or RGB "
                         "images, each optionally with an alpha channel")
    values = torch.from_numpy(np.ascontiguousarray(samples.transpose(2, 0, 1)).astype(np.float32) / scale)
    has_alpha = channels in (2, 4)
    pixels, alpha = (values[:-1], values[-1:]) if has_alpha else (values, None)
    return Picture(pixels.contiguous(), bits, alpha.contiguous() if has_alpha else None, metadata or None)


def read_size(path) -> tuple[int, int]:
    """(width, height) of an image file, from its header (cheap: the pixels are not decoded)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        raise ImageError(f"cannot read {path}: not an image or a corrupt header ({err})") from err


_PILLOW_MODES = {  # Pillow mode of an 8-bit file -> the mode whose samples svnr keeps
    "1": "L", "L": "L", "P": "RGBA", "PA": "RGBA", "LA": "LA", "La": "LA", "RGB": "RGB", "RGBA": "RGBA",
    "RGBa": "RGBA", "RGBX": "RGB", "CMYK": "RGB", "YCbCr": "RGB",
}


def _read_pillow(path: Path) -> tuple[np.ndarray, dict]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            metadata = {key: im.info[key] for key in ("icc_profile", "exif") if im.info.get(key)}
            if im.mode not in _PILLOW_MODES:
                raise ImageError(f"{path}: image mode {im.mode!r} is not supported; svnr reads 8- and 16-bit "
                                 "gray or RGB images (with or without alpha)")
            target = _PILLOW_MODES[im.mode]
            if im.mode == "P" and "transparency" not in im.info:
                target = "RGB"
            converted = im if im.mode == target else im.convert(target)
            samples = np.asarray(converted)
    except UnidentifiedImageError as err:
        raise ImageError(f"cannot read {path}: not a {_format(path).upper()} image ({err})") from err
    return samples, metadata


def _read_tiff(path: Path) -> tuple[np.ndarray, dict]:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if not tif.series:
            raise ImageError(f"{path}: the TIFF holds no image")
        series = tif.series[0]
        axes = series.axes
        samples = series.asarray()
        page = tif.pages[0]
        icc = page.tags.get("InterColorProfile")
        metadata = {"icc_profile": bytes(icc.value)} if icc is not None else {}
    kept = axes.replace("Y", "").replace("X", "").replace("S", "")
    if kept:
        raise ImageError(f"{path}: the TIFF holds a stack (axes {axes!r}, shape {samples.shape}); svnr reads one "
                         "image per file")
    order = [axes.index(a) for a in "YXS" if a in axes]
    return samples.transpose(order), metadata


# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------

def write_image(path, pixels: torch.Tensor, bits: int = 8, alpha: torch.Tensor | None = None,
                metadata: dict | None = None, quality: int = 95) -> None:
    """Write (C, H, W) values in [0, 1] (clipped) as 8- or 16-bit PNG/TIFF, or 8-bit JPEG.

    `alpha` (1, H, W) and `metadata` (from `read_image`) are written where the format allows. The
    file is written to a temporary name first and renamed, so a failed write leaves no half file.
    """
    path = Path(path)
    kind = _format(path)
    if bits not in (8, 16):
        raise ImageError(f"bits must be 8 or 16, got {bits!r}")
    if kind == "jpeg" and bits == 16:
        raise ImageError(f"{path}: JPEG stores 8-bit samples; write a .png or .tif file to keep 16 bits")
    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 3 or pixels.shape[0] not in (1, 3):
        shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise ImageError(f"pixels must be a (C, H, W) tensor with C = 1 (gray) or 3 (RGB), got {shape}")
    planes = pixels
    if alpha is not None:
        if kind == "jpeg":
            raise ImageError(f"{path}: JPEG has no alpha channel; write a .png or .tif file to keep it")
        if tuple(alpha.shape) != (1, *pixels.shape[1:]):
            raise ImageError(f"alpha must have shape (1, H, W) = {(1, *pixels.shape[1:])}, got {tuple(alpha.shape)}")
        planes = torch.cat([pixels, alpha.to(pixels.dtype)])
    scale, dtype = (255.0, np.uint8) if bits == 8 else (65535.0, np.uint16)
    values = planes.detach().to("cpu", torch.float64).clamp(0, 1).mul(scale).round().numpy().astype(dtype)
    samples = np.ascontiguousarray(values.transpose(1, 2, 0))
    metadata = metadata or {}
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        if kind == "png" and bits == 16:
            temporary.write_bytes(_encode_png16(samples, metadata))
        elif kind == "tiff":
            _write_tiff(temporary, samples, metadata)
        else:
            _write_pillow(temporary, samples, kind, metadata, quality)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _write_pillow(path: Path, samples: np.ndarray, kind: str, metadata: dict, quality: int) -> None:
    from PIL import Image

    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[samples.shape[2]]
    image = Image.fromarray(samples[:, :, 0] if mode == "L" else samples, mode)
    options = {key: metadata[key] for key in ("icc_profile", "exif") if metadata.get(key)}
    if kind == "jpeg":
        options.update(quality=quality, subsampling=0)
    image.save(path, format=kind.upper(), **options)


def _write_tiff(path: Path, samples: np.ndarray, metadata: dict) -> None:
    import tifffile

    channels = samples.shape[2]
    options = {"photometric": "rgb" if channels >= 3 else "minisblack", "compression": "zlib"}
    if channels in (2, 4):
        options["extrasamples"] = ["unassalpha"]
    if metadata.get("icc_profile"):
        options["iccprofile"] = metadata["icc_profile"]
    tifffile.imwrite(path, samples[:, :, 0] if channels == 1 else samples, **options)


# ---------------------------------------------------------------------------------------------------
# 16-bit PNG codec (Pillow keeps only the high byte of 16-bit colour PNGs)
# ---------------------------------------------------------------------------------------------------

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 4: 2, 2: 3, 6: 4}      # colour type -> samples per pixel
_PNG_COLOUR_TYPES = {c: t for t, c in _PNG_CHANNELS.items()}


def _png_bit_depth(path: Path) -> int | None:
    """The IHDR bit depth of a PNG file, or None when the header is not PNG (Pillow then explains)."""
    with path.open("rb") as f:
        head = f.read(33)
    if len(head) < 33 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    return head[24]


def _png_chunks(data: bytes, path: Path):
    if data[:8] != _PNG_SIGNATURE:
        raise ImageError(f"cannot read {path}: not a PNG file")
    pos = 8
    while pos < len(data):
        if pos + 8 > len(data):
            break
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        crc = data[pos + 8 + length:pos + 12 + length]
        if len(body) != length or len(crc) != 4:
            break
        if struct.unpack(">I", crc)[0] != zlib.crc32(kind + body) & 0xFFFFFFFF:
            raise ImageError(f"cannot read {path}: PNG chunk {kind.decode('latin-1')!r} is corrupt (CRC mismatch)")
        yield kind, body
        if kind == b"IEND":
            return
        pos += 12 + length
    raise ImageError(f"cannot read {path}: the PNG file is truncated (no IEND chunk)")


def _read_png16(path: Path) -> tuple[np.ndarray, dict]:
    header, idat, metadata = None, [], {}
    for kind, body in _png_chunks(path.read_bytes(), path):
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"iCCP":
            name_end = body.index(b"\0")
            metadata["icc_profile"] = zlib.decompress(body[name_end + 2:])
        elif kind == b"eXIf":
            metadata["exif"] = body
    if header is None:
        raise ImageError(f"cannot read {path}: the PNG has no IHDR chunk")
    width, height, depth, colour_type, _, _, interlace = header
    if colour_type not in _PNG_CHANNELS:
        raise ImageError(f"{path}: PNG colour type {colour_type} is not supported at 16 bits")
    if interlace:
        raise ImageError(f"{path}: interlaced 16-bit PNGs are not supported; save it without interlacing")
    channels = _PNG_CHANNELS[colour_type]
    bpp = 2 * channels
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8)
    if raw.size != height * (1 + width * bpp):
        raise ImageError(f"cannot read {path}: the PNG image data is truncated ({raw.size} of "
                         f"{height * (1 + width * bpp)} bytes)")
    rows = raw.reshape(height, 1 + width * bpp)
    filters = rows[:, 0]
    if filters.max(initial=0) > 4:
        raise ImageError(f"cannot read {path}: the PNG image data is corrupt (filter type {filters.max()})")
    pixels = _png_unfilter(filters, rows[:, 1:].reshape(height, width, bpp))
    samples = pixels.reshape(height, width * bpp).view(">u2").reshape(height, width, channels)
    return samples.astype(np.uint16), metadata


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def _png_unfilter(filters: np.ndarray, data: np.ndarray) -> np.ndarray:
    """Undo PNG row filters: data (H, W, bpp) bytes -> reconstructed bytes of the same shape.

    A byte depends on its left, upper and upper-left neighbours, so all pixels of one anti-diagonal
    (i + x = const) are independent: H + W - 1 vectorised steps instead of H * W scalar ones.
    """
    height, width, bpp = data.shape
    out = np.zeros((height + 1, width + 1, bpp), dtype=np.int16)   # row 0 and column 0: the zero padding
    data = data.astype(np.int16)
    kinds = filters.astype(np.int16)
    for s in range(height + width - 1):
        i = np.arange(max(0, s - width + 1), min(height, s + 1))
        x = s - i
        a, b, c = out[i + 1, x], out[i, x + 1], out[i, x]
        kind = kinds[i][:, None]
        predicted = np.select([kind == 1, kind == 2, kind == 3, kind == 4], [a, b, (a + b) >> 1, _paeth(a, b, c)], 0)
        out[i + 1, x + 1] = (data[i, x] + predicted) & 0xFF
    return out[1:, 1:].astype(np.uint8)


def _png_filter(pixels: np.ndarray, kind: int) -> np.ndarray:
    """Apply one PNG filter type to every row: (H, W, bpp) bytes -> filtered bytes (vectorised)."""
    x = pixels.astype(np.int16)
    a = np.zeros_like(x)
    a[:, 1:] = x[:, :-1]
    b = np.zeros_like(x)
    b[1:] = x[:-1]
    c = np.zeros_like(x)
    c[1:, 1:] = x[:-1, :-1]
    predicted = [np.zeros_like(x), a, b, (a + b) >> 1, _paeth(a, b, c)][kind]
    return ((x - predicted) & 0xFF).astype(np.uint8)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _encode_png16(samples: np.ndarray, metadata: dict, filter_kind: int = 4) -> bytes:
    """(H, W, S) uint16 -> 16-bit PNG bytes (one filter type for every row; Paeth compresses photos well)."""
    height, width, channels = samples.shape
    pixels = samples.astype(">u2").view(np.uint8).reshape(height, width, 2 * channels)
    filtered = _png_filter(pixels, filter_kind).reshape(height, -1)
    rows = np.concatenate([np.full((height, 1), filter_kind, np.uint8), filtered], axis=1)
    header = struct.pack(">IIBBBBB", width, height, 16, _PNG_COLOUR_TYPES[channels], 0, 0, 0)
    chunks = [_png_chunk(b"IHDR", header)]
    if metadata.get("icc_profile"):
        chunks.append(_png_chunk(b"iCCP", b"ICC profile\0\0" + zlib.compress(metadata["icc_profile"])))
    if metadata.get("exif"):
        chunks.append(_png_chunk(b"eXIf", metadata["exif"]))
    chunks += [_png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)), _png_chunk(b"IEND", b"")]
    return _PNG_SIGNATURE + b"".join(chunks)
