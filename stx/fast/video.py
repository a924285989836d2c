"""Video clips through a feed-forward model, with PyAV (FFmpeg's libraries in the ``av`` wheel).

:func:`stylize_clip` decodes a clip frame by frame, stylises the frames in batches, encodes them into a
new clip at the same frame rate (H.264 in an MP4, ``yuv420p``, so even frame sizes) and copies the audio
packets through unchanged. Frames are streamed, so memory does not grow with the clip's length; with
``measure`` the warping error of the result (:mod:`stx.engine.temporal`) is computed as it goes, with the
input clip's own beside it. A file that is not a video, or a codec FFmpeg lacks, is one paragraph; what
was encoded before a fault in the middle of a clip is kept (the file is closed properly).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from stx.engine.image import long_edge_shape, resize_to, to_pil
from stx.engine.temporal import WarpingError
from stx.errors import StxError, first_line

VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi")
"""Files ``stx stylize`` treats as clips."""
CODEC = "libx264"


@dataclass(frozen=True)
class ClipResult:
    """A stylised clip: where it was written, its frame count and rate, and (when measured) its warping
    error and the input's."""

    path: Path
    frames: int
    rate: float
    warping_error: float | None = None
    input_warping_error: float | None = None


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def _even(shape: tuple[int, int]) -> tuple[int, int]:
    """``(H, W)`` rounded down to even numbers (4:2:0 chroma halves both)."""
    return max(2, shape[0] // 2 * 2), max(2, shape[1] // 2 * 2)


@torch.no_grad()
def stylize_clip(model: Callable[[torch.Tensor], torch.Tensor], source: Path, target: Path, device: torch.device,
                 *, size: int | None = None, batch_size: int = 4, measure: bool = False) -> ClipResult:
    """Stylise every frame of the clip ``source`` with ``model`` into ``target`` (an MP4), frames resized to
    long edge ``size`` when given, ``batch_size`` frames per call; see the module docstring."""
    import av

    from stx.fast.stylize import checked_output

    try:
        source_file = av.open(str(source))
    except (av.error.FFmpegError, OSError) as exc:
        raise StxError(f"{str(source)!r} could not be opened as a video ({first_line(exc)}): give a clip FFmpeg "
                       f"reads (MP4, MOV, MKV, WebM, AVI).") from exc
    with source_file:
        if not source_file.streams.video:
            raise StxError(f"{str(source)!r} has no video stream: give a clip with pictures in it.")
        video = source_file.streams.video[0]
        audio = source_file.streams.audio[0] if source_file.streams.audio else None
        rate = video.average_rate or video.guessed_rate
        height, width = video.codec_context.height, video.codec_context.width
        shape = _even(long_edge_shape(height, width, size) if size else (height, width))
        if CODEC not in av.codecs_available:
            raise StxError(f"this FFmpeg has no {CODEC} encoder, which stx writes clips with: install PyAV's wheel "
                           f"(pip install av), which ships it.")
        target.parent.mkdir(parents=True, exist_ok=True)
        measured = WarpingError() if measure else None
        count = 0
        with av.open(str(target), "w") as output_file:
            encoder = output_file.add_stream(CODEC, rate=rate)
            encoder.height, encoder.width, encoder.pix_fmt = shape[0], shape[1], "yuv420p"
            copied = output_file.add_stream_from_template(audio) if audio is not None else None

            def encode(frames: list[torch.Tensor]) -> None:
                nonlocal count
                batch = resize_to(torch.stack(frames), shape)
                styled = checked_output(model(batch.to(device)), batch).cpu()
                for frame, result in zip(batch, styled):
                    if measured is not None:
                        measured.add(frame, result)
                    encoded = av.VideoFrame.from_image(to_pil(result[None]))  # 8-bit as stx stylize writes images
                    encoded.pts = count
                    output_file.mux(encoder.encode(encoded))
                    count += 1

            pending: list[torch.Tensor] = []
            total = video.frames or None
            try:
                with tqdm(total=total, desc=f"stx stylize {source.name}", unit="frame", dynamic_ncols=True) as bar:
                    for packet in source_file.demux(*[s for s in (video, audio) if s is not None]):
                        if packet.stream is audio:
                            if packet.dts is not None:
                                packet.stream = copied
                                output_file.mux(packet)
                            continue
                        for frame in packet.decode():
                            pending.append(torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)
                                           .float().div(255))
                            if len(pending) == batch_size:
                                encode(pending)
                                bar.update(len(pending))
                                pending = []
                    if pending:
                        encode(pending)
                        bar.update(len(pending))
            except av.error.FFmpegError as exc:
                raise StxError(f"{str(source)!r} could not be decoded after frame {count} ({first_line(exc)}): the "
                               f"file is truncated or damaged; the {count} frame(s) before the fault are in "
                               f"{target}.") from exc
            finally:
                output_file.mux(encoder.encode(None))
    return ClipResult(target, count, float(rate), measured.value if measured else None,
                      measured.reference if measured else None)
