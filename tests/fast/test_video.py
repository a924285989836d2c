"""Clips through a fast model (``stx stylize … clip.mp4``) and the warping error that measures flicker."""

import av
import numpy as np
import pytest
import torch
from clips import make_clip

from stx.engine import temporal
from stx.engine.image import read_image
from stx.errors import StxError
from stx.fast.transformer import TransformerNet
from stx.fast.video import stylize_clip
from stx.runs.schema import ASSETS_DIR


def pan(frames=4, shift=3):
    """Crops of the sample photo whose content moves ``shift`` px right each frame (known flow: +shift, 0)."""
    photo = read_image(ASSETS_DIR / "content.png", 200)[0]
    return [photo[:, 10:130, 40 - shift * t:200 - shift * t] for t in range(frames)]


def test_a_static_clip_scores_zero_and_per_frame_noise_does_not():
    still = [read_image(ASSETS_DIR / "content.png", 96)[0]] * 4
    assert temporal.warping_error(still, still) < 1e-9
    generator = torch.Generator().manual_seed(0)
    noisy = [(frame + 0.05 * torch.randn(frame.shape, generator=generator)).clamp(0, 1) for frame in still]
    assert temporal.warping_error(still, noisy) > 1e-3  # ≈ 3 × 0.05² where nothing moved


def test_a_known_pan_checks_the_flow_the_warp_and_the_masks():
    first, second = pan()[:2]
    forward, backward = temporal.flow(first, second), temporal.flow(second, first)
    assert np.abs(forward[10:-10, 10:-10].mean(axis=(0, 1)) - [3, 0]).max() < 0.1
    assert np.abs(backward[10:-10, 10:-10].mean(axis=(0, 1)) - [-3, 0]).max() < 0.1
    mask = temporal.reliable(forward, backward)
    assert not mask[:, -3:].any() and mask[:, :-6].float().mean() > 0.9  # the right edge leaves the next frame
    warped = temporal.warp(second, forward)
    assert (warped - first)[:, :, :-6].abs().mean() < 0.01 < (second - first).abs().mean()
    assert temporal.warping_error(pan(), pan()) < 1e-4  # a clip is consistent with itself


def test_a_clip_keeps_its_frames_rate_and_audio_and_its_flicker_is_measured(tmp_path):
    clip = make_clip(tmp_path / "pan.mp4")
    model = TransformerNet(channels=4, residual_blocks=1).eval()
    result = stylize_clip(model, clip, tmp_path / "out" / "pan.mp4", torch.device("cpu"), batch_size=5, measure=True)
    with av.open(str(result.path)) as written:
        assert [stream.type for stream in written.streams] == ["video", "audio"]
        assert written.streams.video[0].average_rate == 12 and written.streams.audio[0].codec_context.name == "aac"
        frames = [frame.to_ndarray(format="rgb24") for frame in written.decode(video=0)]
    assert result.frames == len(frames) == 12 and result.rate == 12 and frames[0].shape == (48, 64, 3)
    assert result.warping_error > 10 * result.input_warping_error  # a random network flickers; the pan does not
    unsteady = stylize_clip(lambda images: torch.rand_like(images), clip, tmp_path / "noise.mp4", torch.device("cpu"),
                            measure=True)
    assert unsteady.warping_error > result.warping_error


def test_files_that_are_not_clips_are_one_paragraph(tmp_path):
    (tmp_path / "notes.mp4").write_text("not a video")
    with pytest.raises(StxError, match="could not be opened as a video .* give a clip FFmpeg reads"):
        stylize_clip(lambda x: x, tmp_path / "notes.mp4", tmp_path / "out.mp4", torch.device("cpu"))


def test_stx_stylize_writes_a_clip_beside_images_and_reports_its_flicker(tmp_path):
    import subprocess

    from conftest import CONTENT, STX

    from stx.fast import export

    model = export.export_torchscript(TransformerNet(channels=4, residual_blocks=1), tmp_path / "tiny.pt")
    clip = make_clip(tmp_path / "pan.mov")  # any container FFmpeg reads; written as .mp4
    done = subprocess.run([*STX, "stylize", str(model), str(clip), str(CONTENT), "--out", str(tmp_path / "out"),
                           "--measure"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "stx: stylised 1 image(s)" in done.stdout
    assert f"stx: stylised 12 frame(s) of {clip} at 12 frames/s into {tmp_path / 'out' / 'pan.mp4'}; warping error " \
           in done.stdout and "(the input clip's own: " in done.stdout
    assert (tmp_path / "out" / "pan.mp4").is_file() and (tmp_path / "out" / "content.png").is_file()
