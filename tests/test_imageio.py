import numpy as np
import pytest
import torch
from PIL import Image

from svnr_fast.app import imageio

ICC = b"\x00\x00\x02\x0cfake icc profile bytes for a round trip" * 3


def _pixels(channels, H=13, W=17, bits=8, seed=0):
    levels = 2**bits - 1
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, levels + 1, (channels, H, W), generator=g).float() / levels


@pytest.mark.parametrize("suffix", [".png", ".tif", ".tiff"])
@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("channels,alpha", [(1, False), (3, False), (1, True), (3, True)])
def test_lossless_round_trip(tmp_path, suffix, bits, channels, alpha):
    pixels = _pixels(channels, bits=bits)
    alpha_plane = _pixels(1, bits=bits, seed=1) if alpha else None
    path = tmp_path / f"x{suffix}"
    imageio.write_image(path, pixels, bits=bits, alpha=alpha_plane)
    picture = imageio.read_image(path)
    assert picture.bits == bits
    assert picture.pixels.dtype == torch.float32 and picture.pixels.shape == pixels.shape
    torch.testing.assert_close(picture.pixels, pixels, rtol=0, atol=1e-7)
    if alpha:
        torch.testing.assert_close(picture.alpha, alpha_plane, rtol=0, atol=1e-7)
    else:
        assert picture.alpha is None


def test_values_are_clipped_and_rounded(tmp_path):
    pixels = torch.tensor([[[-0.5, 0.2, 1.7, 0.5 / 255 + 1e-4]]])
    imageio.write_image(tmp_path / "x.png", pixels)
    read = imageio.read_image(tmp_path / "x.png").pixels
    assert read.flatten().tolist() == pytest.approx([0.0, 51 / 255, 1.0, 1 / 255])


def test_jpeg_round_trip_is_close_and_8_bit(tmp_path):
    y, x = torch.meshgrid(torch.linspace(0, 1, 48), torch.linspace(0, 1, 64), indexing="ij")
    pixels = torch.stack([y, x, (x + y) / 2])
    imageio.write_image(tmp_path / "x.jpg", pixels, quality=95)
    picture = imageio.read_image(tmp_path / "x.jpg")
    assert picture.bits == 8 and picture.alpha is None and picture.pixels.shape == (3, 48, 64)
    assert (picture.pixels - pixels).abs().mean() < 2 / 255


def test_16_bit_png_matches_independent_decoders(tmp_path):
    # Pillow reads 16-bit gray PNGs exactly, and the high bytes of 16-bit colour ones
    gray = (torch.arange(40 * 30, dtype=torch.float32).reshape(1, 30, 40) * 53 % 65536) / 65535
    imageio.write_image(tmp_path / "g.png", gray, bits=16)
    with Image.open(tmp_path / "g.png") as im:
        assert im.mode == "I;16"
        np.testing.assert_array_equal(np.asarray(im), (gray[0] * 65535).round().numpy().astype(np.uint16))
    rgb = _pixels(3, 21, 19, bits=16)
    imageio.write_image(tmp_path / "c.png", rgb, bits=16)
    with Image.open(tmp_path / "c.png") as im:
        high = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
    np.testing.assert_array_equal(high, ((rgb * 65535).round().numpy().astype(np.uint16) >> 8))


def test_png_decoder_undoes_every_filter_type_row_by_row(tmp_path):
    samples = (np.random.default_rng(0).integers(0, 65536, (23, 11, 3))).astype(np.uint16)
    pixels = samples.astype(">u2").view(np.uint8).reshape(23, 11, 6)
    filtered = [imageio._png_filter(pixels, kind) for kind in range(5)]
    kinds = np.arange(23) % 5
    rows = np.stack([filtered[k][i] for i, k in enumerate(kinds)])
    assert np.array_equal(imageio._png_unfilter(kinds.astype(np.uint8), rows), pixels)


def test_metadata_is_carried_through(tmp_path):
    for name, bits in (("a.png", 8), ("b.png", 16), ("c.jpg", 8), ("d.tif", 16)):
        imageio.write_image(tmp_path / name, _pixels(3), bits=bits, metadata={"icc_profile": ICC})
        assert imageio.read_image(tmp_path / name).metadata["icc_profile"] == ICC, name


def test_palette_png_reads_as_rgb(tmp_path):
    image = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).convert("P")
    image.save(tmp_path / "p.png")
    picture = imageio.read_image(tmp_path / "p.png")
    assert picture.pixels.shape[0] == 3 and picture.bits == 8


def test_read_size_reads_only_the_header(tmp_path):
    imageio.write_image(tmp_path / "x.png", _pixels(3, 12, 34), bits=16)
    assert imageio.read_size(tmp_path / "x.png") == (34, 12)


@pytest.mark.parametrize("name,bits", [("x.png", 8), ("x.png", 16), ("x.jpg", 8), ("x.tif", 16)])
def test_truncated_files_give_a_clear_error(tmp_path, name, bits):
    path = tmp_path / name
    imageio.write_image(path, _pixels(3, 64, 64), bits=bits)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(imageio.ImageError, match="cannot read|truncated|corrupt"):
        imageio.read_image(path)


def test_unreadable_and_unsupported_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no image file"):
        imageio.read_image(tmp_path / "missing.png")
    (tmp_path / "noise.png").write_bytes(np.random.default_rng(0).bytes(500))
    with pytest.raises(imageio.ImageError, match="cannot read"):
        imageio.read_image(tmp_path / "noise.png")
    (tmp_path / "x.bmp").write_bytes(b"BM")
    with pytest.raises(imageio.ImageError, match="unsupported file type"):
        imageio.read_image(tmp_path / "x.bmp")
    import tifffile
    tifffile.imwrite(tmp_path / "five.tif", np.zeros((8, 8, 5), np.uint8), photometric="minisblack",
                     planarconfig="contig")
    with pytest.raises(imageio.ImageError, match="5 channels"):
        imageio.read_image(tmp_path / "five.tif")
    tifffile.imwrite(tmp_path / "float.tif", np.zeros((8, 8), np.float32))
    with pytest.raises(imageio.ImageError, match="8- and 16-bit"):
        imageio.read_image(tmp_path / "float.tif")


def test_bad_writes_say_what_is_wrong(tmp_path):
    with pytest.raises(imageio.ImageError, match="JPEG stores 8-bit"):
        imageio.write_image(tmp_path / "x.jpg", _pixels(3), bits=16)
    with pytest.raises(imageio.ImageError, match="no alpha"):
        imageio.write_image(tmp_path / "x.jpg", _pixels(3), alpha=_pixels(1))
    with pytest.raises(imageio.ImageError, match="C = 1 .gray. or 3"):
        imageio.write_image(tmp_path / "x.png", _pixels(2))
    with pytest.raises(imageio.ImageError, match="bits must be 8 or 16"):
        imageio.write_image(tmp_path / "x.png", _pixels(3), bits=12)
    assert not list(tmp_path.iterdir())      # nothing half-written
