"""Synthetic clips for the video tests and benchmarks/video_throughput.py: no video file ships with stx."""

import av
import numpy as np


def make_clip(path, frames=12, size=(48, 64), rate=12, shift=2, audio=True):
    """An H.264 clip (container from ``path``'s suffix) panning over a smooth random texture by ``shift`` px a
    frame, ``size = (H, W)``, with a 440 Hz AAC tone unless not ``audio``; returns ``path``."""
    rng = np.random.default_rng(0)
    height, width = size
    base = rng.random((height // 4 + 2, (width + shift * frames) // 4 + 2, 3))
    texture = np.kron(base, np.ones((4, 4, 1)))[:height, :width + shift * frames]
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=rate)
        video.height, video.width, video.pix_fmt = height, width, "yuv420p"
        tone = out.add_stream("aac", rate=16000) if audio else None
        for t in range(frames):
            left = shift * (frames - t)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(
                (texture[:, left:left + width] * 255).astype(np.uint8)), format="rgb24")
            frame.pts = t
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        if tone is not None:
            samples = (0.3 * np.sin(2 * np.pi * 440 * np.arange(16000 * frames // rate) / 16000)).astype(np.float32)
            for start in range(0, len(samples), 1024):
                chunk = av.AudioFrame.from_ndarray(samples[None, start:start + 1024], format="flt", layout="mono")
                chunk.sample_rate, chunk.pts = 16000, start
                out.mux(tone.encode(chunk))
            out.mux(tone.encode(None))
    return path
