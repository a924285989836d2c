"""Image I/O: every mode Pillow opens read into [0, 1], contiguous tensors, the large-image policy."""

import logging
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from conftest import FAST, Totals, only_run, stx_here
from PIL import Image

from stx.engine import image as stx_image
from stx.engine import inputs, losses, plan
from stx.engine.image import image_shape, read_image, resize, write_image
from stx.engine.optim import optimise_image
from stx.errors import ConfigError, ImageError
from stx.runs.job import build_job, build_schedule

ALPHA_DROPPED = "its alpha channel is dropped"


def png(path, width, height, bit_depth, colour_type, raw=b""):
    """A PNG written chunk by chunk (Pillow cannot write 48-bit RGB): ``raw`` is the unfiltered
    scanline data; without it the file is only a header (its IDAT holds nothing decodable)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw) if raw else b"x")
                     + chunk(b"IEND", b""))
    return path


def pixels(image):
    """The ``3×H×W`` values of a read image as float64 numpy."""
    return image[0].double().numpy()


def same(image, expected):
    """Whether a read image holds ``expected`` (``3×H×W`` or broadcastable) up to float32 rounding."""
    return np.allclose(pixels(image), np.broadcast_to(expected, image.shape[1:]), rtol=0, atol=1e-7)


def stx_records(caplog):
    return [record for record in caplog.records if record.name == "stx.engine.image"]


def test_round_trip_keeps_pixels_and_range(tmp_path, rng):
    image = torch.randint(0, 256, (1, 3, 20, 30), generator=rng).float() / 255
    path = write_image(image, tmp_path / "a.png")
    back = read_image(path)
    assert back.shape == (1, 3, 20, 30)
    assert torch.equal(back, image)


def test_read_resizes_long_edge_keeping_aspect(tmp_path):
    Image.new("RGB", (200, 100), (255, 0, 0)).save(tmp_path / "wide.png")
    image = read_image(tmp_path / "wide.png", size=64)
    assert image.shape == (1, 3, 32, 64)
    assert image.min() >= 0 and image.max() <= 1
    assert torch.allclose(image[0, 0], torch.ones(32, 64), atol=1e-3)


def test_missing_image_error_names_path(tmp_path):
    with pytest.raises(ImageError, match="nope.png.*does not exist"):
        read_image(tmp_path / "nope.png")


def test_corrupt_image_error_names_path(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(ImageError, match="bad.jpg.*could not be read"):
        read_image(bad)


@pytest.mark.parametrize("size", [0, 3, 100000, -5, 12.5])
def test_impossible_size_is_refused(size):
    with pytest.raises(ImageError, match="impossible"):
        resize(torch.rand(1, 3, 8, 8), size)


# --- contiguous tensors (issue 9, item 1) -------------------------------------------------------

@pytest.mark.parametrize("width,height,size", [(64, 40, 64), (40, 64, None), (1, 1, None), (1, 1, 16), (300, 1, 32)])
def test_read_image_is_contiguous(tmp_path, width, height, size):
    Image.fromarray(np.arange(width * height * 3, dtype=np.uint8).reshape(height, width, 3)).save(tmp_path / "a.png")
    image = read_image(tmp_path / "a.png", size)
    expected = (height, width) if size is None else stx_image.long_edge_shape(height, width, size)
    assert image.shape == (1, 3, *expected) and image.is_contiguous()


@pytest.mark.parametrize("width,height,size", [(64, 40, 64), (1, 1, 16)])
@pytest.mark.parametrize("bounds", ["sigmoid", "clamp"])
def test_image_read_at_its_target_size_optimises_with_lbfgs(make_cfg, tmp_path, width, height, size, bounds):
    noise = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "content.png")
    content = read_image(tmp_path / "content.png", size)
    assert content.is_contiguous()
    objective = losses.PerceptualObjective(None, {"tv": losses.TotalVariationLoss()})
    schedule = build_schedule(make_cfg(f"schedule.size={size}", "schedule.steps=3", f"schedule.bounds={bounds}"))
    recorder = Totals()
    out = optimise_image(objective, content=content, styles=[content], style_weights=[1.0], schedule=schedule,
                         callback=recorder)
    assert out.shape == content.shape and len(recorder.totals) == 3 and all(np.isfinite(recorder.totals))


@pytest.mark.slow
def test_stx_runs_a_content_image_whose_long_edge_is_the_target_size(tmp_path, fresh_store):
    fresh_store(tmp_path)
    noise = np.random.default_rng(0).integers(0, 256, (40, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "content.png")
    result = stx_here(tmp_path, "encoder.weights=random", "schedule.size=64", "schedule.steps=2",
                     f"images.content={tmp_path / 'content.png'}")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    client, run = only_run(tmp_path)
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "total")) == [1, 2]


# --- every mode into [0, 1] (issue 9, item 2) ---------------------------------------------------

def test_16_bit_grey_png_is_read_at_full_depth(tmp_path, caplog):
    values = np.linspace(0, 65535, 64 * 40).round().astype(np.uint16).reshape(40, 64)
    Image.fromarray(values).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    image = read_image(tmp_path / "grey16.png")
    assert image.mean().item() == pytest.approx(0.5, abs=1e-3)
    assert (image == 1.0).float().mean().item() < 0.001  # was 99.6 % (clipped at 255/65535)
    assert same(image, values / 65535)
    assert not stx_records(caplog)


def test_16_bit_big_endian_tiff(tmp_path):
    values = np.array([[0, 1, 256, 40000, 65535]], dtype=np.uint16)
    Image.frombytes("I;16B", (5, 1), values.astype(">u2").tobytes()).save(tmp_path / "big_endian.tif")
    assert Image.open(tmp_path / "big_endian.tif").mode == "I;16B"
    assert same(read_image(tmp_path / "big_endian.tif"), values / 65535)


def test_48_bit_rgb_png_keeps_its_range(tmp_path):
    values = np.array([[[0, 32768, 65535], [1000, 20000, 60000]]], dtype=np.uint16)  # 1×2 RGB
    png(tmp_path / "rgb48.png", 2, 1, 16, 2, b"\x00" + values.astype(">u2").tobytes())
    image = read_image(tmp_path / "rgb48.png")
    expected = values[0].T.reshape(3, 1, 2) / 65535
    assert np.abs(pixels(image) - expected).max() <= 1 / 255  # Pillow reads 16-bit RGB at 8 bits


def test_16_bit_pgm_is_read_at_full_depth(tmp_path):
    values = np.array([[0, 1, 32768, 65535]], dtype=np.uint16)
    (tmp_path / "grey16.pgm").write_bytes(b"P5\n4 1\n65535\n" + values.astype(">u2").tobytes())
    assert Image.open(tmp_path / "grey16.pgm").mode == "I"
    assert same(read_image(tmp_path / "grey16.pgm"), values / 65535)


def test_32_bit_integer_image_beyond_16_bits_uses_the_32_bit_range(tmp_path):
    values = np.array([[0, 70000, 2**30, 2**31 - 1]], dtype=np.int32)
    Image.fromarray(values).save(tmp_path / "int32.tif")
    assert same(read_image(tmp_path / "int32.tif"), values / (2**31 - 1))


def test_32_bit_integer_image_with_negative_values_is_refused(tmp_path):
    Image.fromarray(np.array([[5, -3]], dtype=np.int32)).save(tmp_path / "signed.tif")
    with pytest.raises(ImageError, match=r"signed\.tif.*negative values \(down to -3\)"):
        read_image(tmp_path / "signed.tif")


def test_float_image_is_read_as_it_is(tmp_path):
    values = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)
    Image.fromarray(values).save(tmp_path / "float.tif")
    assert same(read_image(tmp_path / "float.tif"), values)


@pytest.mark.parametrize("bad,shown", [(2.0, r"from 0\.0 to 2\.0"), (-0.5, r"from -0\.5 to 0\.5"), (float("nan"), "NaN"),
                                       (float("inf"), "inf")])
def test_float_image_outside_0_1_is_refused(tmp_path, bad, shown):
    Image.fromarray(np.array([[0.0, 0.5, bad]], dtype=np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(ImageError, match=rf"float\.tif.*{shown}.*rescale it to \[0, 1\]"):
        read_image(tmp_path / "float.tif")


def test_one_bit_image(tmp_path):
    Image.fromarray(np.array([[True, False, True]])).save(tmp_path / "bits.png")
    assert Image.open(tmp_path / "bits.png").mode == "1"
    assert same(read_image(tmp_path / "bits.png"), [[1.0, 0.0, 1.0]])


def test_grey_image_fills_three_channels(tmp_path):
    Image.fromarray(np.array([[0, 51, 255]], dtype=np.uint8)).save(tmp_path / "grey.png")
    image = read_image(tmp_path / "grey.png")
    assert image.is_contiguous()
    assert same(image, np.array([[0, 51, 255]]) / 255)


PALETTE = [255, 0, 0, 0, 255, 0, 10, 20, 30]
PALETTE_PIXELS = np.array(PALETTE).reshape(3, 3).T.reshape(3, 1, 3) / 255
"""What a 3×1 image of indices 0, 1, 2 into ``PALETTE`` reads as."""


def palette_image(transparency=None):
    image = Image.frombytes("P", (3, 1), bytes([0, 1, 2]))
    image.putpalette(PALETTE)
    if transparency is not None:
        image.info["transparency"] = transparency
    return image


@pytest.mark.parametrize("transparency", [None, 2, b"\x00\x80\xff"])
def test_palette_image_reads_its_colours(tmp_path, caplog, transparency):
    palette_image(transparency).save(tmp_path / "palette.png")
    assert Image.open(tmp_path / "palette.png").mode == "P"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's "Palette images with Transparency …" must not reach the user
        image = read_image(tmp_path / "palette.png")
    assert same(image, PALETTE_PIXELS)
    records = stx_records(caplog)
    assert len(records) == (0 if transparency is None else 1)
    if records:
        assert "palette.png" in records[0].getMessage() and ALPHA_DROPPED in records[0].getMessage()


def associated_alpha(path):
    """Rewrite a TIFF's ExtraSamples tag from unassociated to associated (premultiplied) alpha."""
    data = bytearray(path.read_bytes())
    ifd = struct.unpack("<I", data[4:8])[0]
    for entry in range(ifd + 2, ifd + 2 + 12 * struct.unpack("<H", data[ifd:ifd + 2])[0], 12):
        if struct.unpack("<H", data[entry:entry + 2])[0] == 338:
            data[entry + 8:entry + 10] = struct.pack("<H", 1)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "mode,colour,name,expected",
    [
        ("RGBA", (200, 100, 50, 0), "rgba.png", (200, 100, 50)),
        ("LA", (90, 128), "la.png", (90, 90, 90)),
        ("RGBA", (200, 100, 50, 255), "opaque_rgba.png", (200, 100, 50)),
        ("RGBA", (100, 50, 20, 128), "premultiplied.tif", (199, 99, 39)),  # stored premultiplied by 128/255
        ("LA", (100, 128), "premultiplied_la.tif", (199, 199, 199)),
    ],
)
def test_alpha_is_dropped_with_one_log_line(tmp_path, caplog, mode, colour, name, expected):
    Image.new(mode, (2, 2), colour).save(tmp_path / name)
    if name.startswith("premultiplied"):
        associated_alpha(tmp_path / name)
    image = read_image(tmp_path / name)
    assert same(image, np.array(expected).reshape(3, 1, 1) / 255)
    (record,) = stx_records(caplog)
    assert record.levelno == logging.WARNING and name in record.getMessage() and ALPHA_DROPPED in record.getMessage()


def test_palette_with_alpha_tiff(tmp_path, caplog):
    image = Image.merge("PA", (Image.frombytes("L", (3, 1), bytes([0, 1, 2])), Image.new("L", (3, 1), 0)))
    image.putpalette(PALETTE)
    image.save(tmp_path / "pa.tif")
    assert Image.open(tmp_path / "pa.tif").mode == "PA"
    assert same(read_image(tmp_path / "pa.tif"), PALETTE_PIXELS)
    assert len(stx_records(caplog)) == 1


@pytest.mark.parametrize("mode,colour", [("CMYK", (0, 255, 40, 10)), ("YCbCr", (120, 60, 200)), ("LAB", (180, 100, 160))])
def test_other_colour_spaces_are_converted_by_pillow(tmp_path, caplog, mode, colour):
    Image.new(mode, (2, 1), colour).save(tmp_path / "colour.tif")
    opened = Image.open(tmp_path / "colour.tif")
    assert opened.mode == mode
    expected = np.asarray(opened.convert("RGB"), dtype=float).transpose(2, 0, 1) / 255
    assert same(read_image(tmp_path / "colour.tif"), expected)
    assert not stx_records(caplog)


@pytest.mark.parametrize("name", ["frames.gif", "frames.tif", "frames.png", "frames.webp"])
def test_only_the_first_frame_is_read_with_one_log_line(tmp_path, caplog, name):
    frames = [Image.new("RGB", (4, 3), colour) for colour in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    lossless = {"lossless": True} if name.endswith("webp") else {}
    frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:], **lossless)
    assert Image.open(tmp_path / name).n_frames == 3
    image = read_image(tmp_path / name)
    assert same(image, np.array([1.0, 0.0, 0.0]).reshape(3, 1, 1))
    (record,) = stx_records(caplog)
    assert name in record.getMessage() and "only its first of 3 frames is used" in record.getMessage()


# --- large images (issue 9, item 3) -------------------------------------------------------------

def test_file_over_the_pixel_limit_is_refused_from_its_header(tmp_path):
    path = png(tmp_path / "huge.png", 100_000, 60_000, 8, 2)  # 6 Gpx claimed; the pixel data is junk
    message = r"huge\.png' has 100000×60000 = 6,000,000,000 pixels, more than stx reads \(268,435,456\): downscale"
    with pytest.raises(ImageError, match=message):
        read_image(path, 64)
    with pytest.raises(ImageError, match=message):
        image_shape(path)


def test_pillow_bomb_check_is_replaced_by_stx_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow warns above 100 px and refuses above 200
    Image.new("RGB", (40, 30), (0, 128, 255)).save(tmp_path / "big.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = read_image(tmp_path / "big.png")
    assert image.shape == (1, 3, 30, 40) and image[0, 2].min() == 1.0
    assert Image.MAX_IMAGE_PIXELS == 100
    monkeypatch.setattr(stx_image, "MAX_PIXELS", 1000)
    with pytest.raises(ImageError, match=r"big\.png' has 40×30 = 1,200 pixels, more than stx reads \(1,000\)"):
        read_image(tmp_path / "big.png")


@pytest.mark.parametrize("name", ["large.png", "large.jpg"])
def test_large_file_is_shrunk_before_resizing_with_the_same_result(tmp_path, name):
    y, x = np.mgrid[0:768, 0:1024]
    smooth = np.stack([x / 1024, y / 768, (x + y) / 1792], -1) * 255
    quality = {"quality": 95} if name.endswith("jpg") else {}
    Image.fromarray(smooth.round().astype(np.uint8)).save(tmp_path / name, **quality)
    shrunk = read_image(tmp_path / name, 64)  # 1024 px ≥ 4 × 64: decoded/box-averaged to 256 px first
    direct = resize(read_image(tmp_path / name), 64)
    assert shrunk.shape == direct.shape == (1, 3, 48, 64) and shrunk.is_contiguous()
    assert (shrunk - direct).abs().max().item() < 0.01


def test_decoding_a_large_input_counts_in_the_memory_estimate(make_cfg, tmp_path, monkeypatch):
    path = png(tmp_path / "12000.png", 12000, 12000, 8, 2)  # a header: nothing may be decoded before the check
    monkeypatch.setattr(plan, "available_bytes", lambda device: int(1.1 * 2**30))
    with pytest.raises(ConfigError, match=r"needs about 1\.1 GiB on cpu \(.*decoding the largest input 1\.07 GiB\)"):
        build_job(make_cfg(*FAST, f"images.content={path}"))
    assert inputs.decode_bytes(12000, 12000, 32) == 8 * 12000**2 + 16 * 65**2  # reduced by 187 to 65×65


def test_decoding_counts_against_host_memory_only_on_the_cpu(monkeypatch):
    monkeypatch.setattr(plan, "available_bytes", lambda device: 2 * 2**30)
    estimate = {"image and optimiser": 2**20, plan.DECODING: 3 * 2**30}
    with pytest.raises(ConfigError, match="decoding the largest input 3.00 GiB"):
        plan.check_fits(estimate, torch.device("cpu"), 64)
    plan.check_fits(estimate, torch.device("cuda"), 64)  # decoded in host memory, not on the GPU


# --- images too thin for the layers --------------------------------------------------------------

@pytest.mark.parametrize(
    "size,overrides,message",
    [
        pytest.param((1, 300), ["images.content={path}"], r"images.content '.*thin.png' \(1×300 px\) at the 32 px pyramid level is only "
                                              r"1×32 px, too small .* relu5_1 comes after 4 poolings .* at least 16 px", id="content"),
        pytest.param((1, 300), ["images.styles=[{path}]"], r"images.styles '.*thin.png' \(1×300 px\)", id="style"),
        pytest.param((64, 40), ["images.content={path}", "loss=mrf", "schedule.size=16"],
                     r"is only 16×10 px, too small .* relu4_1 comes after 3 poolings and needs 3 px on both edges "
                     r"there, i\.e\. at least 24 px", id="mrf-patch"),
    ],
)
def test_image_too_thin_for_the_layers_is_refused_before_the_run(make_cfg, tmp_path, size, overrides, message):
    Image.new("RGB", size, (10, 20, 30)).save(tmp_path / "thin.png")
    with pytest.raises(ConfigError, match=message):
        build_job(make_cfg(*FAST, *(o.format(path=tmp_path / "thin.png") for o in overrides)))


def test_image_just_thick_enough_for_the_layers_is_accepted(make_cfg, tmp_path):
    Image.new("RGB", (32, 16), (10, 20, 30)).save(tmp_path / "wide.png")  # 16 px short edge: relu5_1 is 1×2 px
    job = build_job(make_cfg(*FAST, f"images.content={tmp_path / 'wide.png'}"))
    assert job.content.shape == (1, 3, 16, 32) and job.content.is_contiguous()


@pytest.mark.parametrize("orientation,turn", [(3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_270),
                                              (8, Image.Transpose.ROTATE_90), (5, Image.Transpose.TRANSPOSE)])
def test_exif_orientation_is_applied_as_a_phone_photo_is_meant_to_be_seen(tmp_path, rng, orientation, turn):
    stored = Image.fromarray((torch.rand(24, 40, 3, generator=rng) * 255).byte().numpy())
    exif = Image.Exif()
    exif[stx_image.EXIF_ORIENTATION] = orientation
    stored.save(tmp_path / "phone.png", exif=exif)
    stored.transpose(turn).save(tmp_path / "upright.png")
    upright = read_image(tmp_path / "upright.png")
    assert image_shape(tmp_path / "phone.png") == tuple(upright.shape[-2:]) == ((24, 40) if orientation == 3 else (40, 24))
    assert torch.equal(read_image(tmp_path / "phone.png"), upright)
    assert torch.equal(read_image(tmp_path / "phone.png", 20), read_image(tmp_path / "upright.png", 20))


def test_a_rotated_jpeg_reads_upright_at_any_size(tmp_path):
    stored = Image.new("RGB", (64, 32), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 16, 16))  # red top-left corner as stored
    exif = Image.Exif()
    exif[stx_image.EXIF_ORIENTATION] = 6  # shown turned 90° clockwise: the red corner goes top-right
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    for size in (None, 32):
        image = read_image(tmp_path / "phone.jpg", size)
        height, width = image.shape[-2:]
        assert height == 2 * width
        assert image[0, 0, 2, -3] > 0.9 and image[0, 2, 2, -3] < 0.1  # red, top right
        assert image[0, 0, 2, 2] < 0.1 and image[0, 2, 2, 2] > 0.9  # blue, top left


def display_p3_profile():
    """An ICC v2 matrix/TRC profile of Display P3 (D65 primaries adapted to the D50 PCS with
    Bradford), with a plain 2.2 gamma so the expected colours can be computed by hand."""
    p3_to_xyz_d65 = np.array([[0.48657095, 0.26566769, 0.19821729], [0.22897456, 0.69173852, 0.07928691],
                              [0.0, 0.04511338, 1.04394437]])
    bradford_d65_to_d50 = np.array([[1.0478112, 0.0228866, -0.0501270], [0.0295424, 0.9904844, -0.0170491],
                                    [-0.0092345, 0.0150436, 0.7521316]])
    primaries = bradford_d65_to_d50 @ p3_to_xyz_d65
    s15 = lambda values: b"".join(struct.pack(">i", round(v * 65536)) for v in values)
    xyz = lambda values: b"XYZ \0\0\0\0" + s15(values)
    text = b"Display P3 (test)\0"
    tags = {b"desc": b"desc\0\0\0\0" + struct.pack(">I", len(text)) + text + b"\0" * 12 + b"\0" * 67,
            b"wtpt": xyz((0.9642, 1.0, 0.8249)), b"cprt": b"text\0\0\0\0no copyright\0",
            b"rXYZ": xyz(primaries[:, 0]), b"gXYZ": xyz(primaries[:, 1]), b"bXYZ": xyz(primaries[:, 2]),
            **{kind: b"curv\0\0\0\0" + struct.pack(">IH", 1, round(2.2 * 256)) for kind in (b"rTRC", b"gTRC", b"bTRC")}}
    table, body, offset = b"", b"", 128 + 4 + 12 * len(tags)
    for kind, data in tags.items():
        data += b"\0" * (-len(data) % 4)
        table += kind + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = (struct.pack(">I", size) + b"lcms" + bytes([2, 0x10, 0, 0]) + b"mntrRGB XYZ " + b"\0" * 12 + b"acsp"
              + b"\0" * 24 + struct.pack(">I", 0) + s15((0.9642, 1.0, 0.8249)) + b"\0" * 48)
    return header + struct.pack(">I", len(tags)) + table + body, p3_to_xyz_d65


def test_a_display_p3_image_is_converted_to_srgb(tmp_path):
    profile, p3_to_xyz = display_p3_profile()
    colours = np.array([[153, 77, 51], [51, 153, 77], [128, 128, 128], [90, 60, 160]], dtype=np.uint8)
    pixels_p3 = Image.fromarray(np.repeat(colours[None], 4, axis=0))
    pixels_p3.save(tmp_path / "p3.png", icc_profile=profile)
    pixels_p3.save(tmp_path / "untagged.png")
    xyz_to_srgb = np.linalg.inv(np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                                          [0.0193339, 0.1191920, 0.9503041]]))
    linear = np.clip((colours / 255.0) ** 2.2 @ p3_to_xyz.T @ xyz_to_srgb.T, 0, 1)
    expected = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    read = read_image(tmp_path / "p3.png")[0, :, 0].T.numpy()
    assert np.abs(read - expected).max() < 2.5 / 255
    assert np.abs(read_image(tmp_path / "untagged.png")[0, :, 0].T.numpy() - colours / 255).max() < 1e-6
    assert np.abs(colours / 255 - expected).max() > 10 / 255  # the conversion matters for these colours


def test_an_unreadable_icc_profile_is_taken_as_srgb_with_a_warning(tmp_path, caplog):
    Image.new("RGB", (32, 32), (10, 200, 30)).save(tmp_path / "bad.png", icc_profile=b"not a profile")
    with caplog.at_level(logging.WARNING):
        image = read_image(tmp_path / "bad.png")
    assert same(image, (np.array([10, 200, 30]) / 255)[:, None, None])
    assert any("ICC colour profile could not be read" in r.getMessage() for r in stx_records(caplog))
