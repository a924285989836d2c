"""Temporal consistency of a stylised clip: optical flow, warping, reliability masks and the warping error.

Frames are float tensors in [0, 1], ``3×H×W``; flows are ``H×W×2`` float arrays of (dx, dy) in pixels,
``flow(a, b)`` saying where each pixel of ``a`` is found in ``b`` (``a(x) ≈ b(x + flow(x))``), computed with
OpenCV's DIS optical flow (no learned weights) on the input frames. :func:`warp` samples an image at
``x + flow(x)``. :func:`reliable` is Ruder, Dosovitskiy & Brox's (2016) mask: pixels whose forward flow and
warped backward flow disagree (disocclusions, ``|w + ŵ|² > 0.01 (|w|² + |ŵ|²) + 0.5``) or on motion
boundaries (``|∇u|² + |∇v|² > 0.01 |w|² + 0.002``) are left out. :func:`warping_error` is Lai et al.'s
(2018) ``E_warp``: per pair of consecutive frames, the mean over reliable pixels of the squared RGB
difference between the earlier output and the later output warped back to it; averaged over the clip.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def grey(frame: torch.Tensor) -> np.ndarray:
    """A ``3×H×W`` frame in [0, 1] as an 8-bit luminance array (what DIS reads)."""
    weights = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    return (frame.cpu().float() * weights).sum(0).mul(255).round().clamp(0, 255).byte().numpy()


def flow(first: torch.Tensor, second: torch.Tensor) -> np.ndarray:
    """DIS optical flow (OpenCV's medium preset) from ``first`` to ``second``: ``H×W×2``, in pixels."""
    import cv2

    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    return dis.calc(grey(first), grey(second), None)


def warp_batch(images: torch.Tensor, flows: torch.Tensor) -> torch.Tensor:
    """``images`` (``B×C×H×W``) sampled at ``x + flow(x)`` for ``flows`` (``B×H×W×2``, pixels; bilinear,
    border pixels repeated outside); differentiable, on the images' device."""
    height, width = images.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(height, dtype=flows.dtype, device=flows.device),
                            torch.arange(width, dtype=flows.dtype, device=flows.device), indexing="ij")
    x = (xs + flows[..., 0]) / max(width - 1, 1) * 2 - 1
    y = (ys + flows[..., 1]) / max(height - 1, 1) * 2 - 1
    return F.grid_sample(images, torch.stack([x, y], dim=-1).to(images.dtype), mode="bilinear",
                         padding_mode="border", align_corners=True)


def warp(image: torch.Tensor, flow_field: np.ndarray) -> torch.Tensor:
    """``image`` (``C×H×W``) sampled at ``x + flow(x)`` for a flow from :func:`flow` (on the CPU)."""
    return warp_batch(image[None].float().cpu(), torch.from_numpy(flow_field).float()[None])[0]


def inside(flows: torch.Tensor) -> torch.Tensor:
    """Where ``x + flow(x)`` stays in the frame (``B×H×W`` bool, for ``B×H×W×2`` flows)."""
    height, width = flows.shape[1:3]
    ys, xs = torch.meshgrid(torch.arange(height, device=flows.device), torch.arange(width, device=flows.device),
                            indexing="ij")
    x, y = xs + flows[..., 0], ys + flows[..., 1]
    return (x >= 0) & (x <= width - 1) & (y >= 0) & (y <= height - 1)


def random_flows(count: int, height: int, width: int, shift: float, elastic: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """``count`` smooth random flows (``count×H×W×2``, pixels), the motion of a camera and a scene between
    two frames: an affine part (translation up to ``shift`` px, rotation and scale moving the corners up to
    ``shift`` px) plus an elastic part (noise on an 8×8 grid, bicubically upsampled, up to ``elastic`` px)."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    uniform = lambda *shape: torch.rand(*shape, generator=generator) * 2 - 1
    translation = uniform(count, 1, 1, 2) * shift
    linear = uniform(count, 2, 2) * shift / max(height, width)  # ±shift px at the corners, relative to the centre
    half = torch.tensor([width / 2, height / 2])
    points = torch.stack([xs, ys], dim=-1) * half  # pixels from the centre
    affine = torch.einsum("bij,hwj->bhwi", linear, points) + translation
    noise = uniform(count, 2, 8, 8) * elastic
    smooth = F.interpolate(noise, size=(height, width), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    return affine + smooth


def reliable(forward: np.ndarray, backward: np.ndarray) -> torch.Tensor:
    """Ruder et al.'s mask (``H×W`` bool, on the first frame's grid) for ``forward = flow(a, b)`` and
    ``backward = flow(b, a)``: False at disocclusions and motion boundaries, and where ``x + forward``
    leaves the frame."""
    w = torch.from_numpy(forward).float().permute(2, 0, 1)
    back = warp(torch.from_numpy(backward).float().permute(2, 0, 1), forward)
    disoccluded = (w + back).square().sum(0) > 0.01 * (w.square().sum(0) + back.square().sum(0)) + 0.5
    dy_u, dx_u = torch.gradient(w[0])
    dy_v, dx_v = torch.gradient(w[1])
    boundary = dx_u.square() + dy_u.square() + dx_v.square() + dy_v.square() > 0.01 * w.square().sum(0) + 0.002
    return ~disoccluded & ~boundary & inside(torch.from_numpy(forward).float()[None])[0]


def pair_error(earlier: torch.Tensor, later: torch.Tensor, forward: np.ndarray, mask: torch.Tensor) -> float:
    """Mean over ``mask`` of the squared RGB difference between ``earlier`` and ``later`` warped back by
    ``forward`` (the input frames' flow from the earlier to the later); 0 when no pixel is reliable."""
    difference = (earlier.float().cpu() - warp(later, forward)).square().sum(0)
    return float(difference[mask].mean()) if mask.any() else 0.0


class WarpingError:
    """Lai et al.'s ``E_warp`` of a clip, fed one frame at a time (memory independent of the clip's length):
    :meth:`add` takes each input frame and its output (``3×H×W`` in [0, 1], outputs at the inputs' size);
    :attr:`per_frame` holds each consecutive pair's error, :attr:`value` their mean. ``reference`` is the
    same measure of the input clip itself, beside it for scale."""

    def __init__(self) -> None:
        self.per_frame: list[float] = []
        self.reference_per_frame: list[float] = []
        self._previous: tuple[torch.Tensor, torch.Tensor] | None = None

    def add(self, frame: torch.Tensor, output: torch.Tensor) -> None:
        if self._previous is not None:
            earlier_frame, earlier_output = self._previous
            forward, backward = flow(earlier_frame, frame), flow(frame, earlier_frame)
            mask = reliable(forward, backward)
            self.per_frame.append(pair_error(earlier_output, output, forward, mask))
            self.reference_per_frame.append(pair_error(earlier_frame, frame, forward, mask))
        self._previous = frame.cpu(), output.cpu()

    @property
    def value(self) -> float:
        return float(np.mean(self.per_frame)) if self.per_frame else 0.0

    @property
    def reference(self) -> float:
        return float(np.mean(self.reference_per_frame)) if self.reference_per_frame else 0.0


def warping_error(frames: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    """``E_warp`` of ``outputs`` (a clip's stylised frames) against the flow of ``frames`` (its inputs)."""
    measure = WarpingError()
    for frame, output in zip(frames, outputs):
        measure.add(frame, output)
    return measure.value
