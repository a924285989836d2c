"""Artefacts of a trained feed-forward model: TorchScript, ONNX and int8 ONNX files, and an MLflow model.

The MLflow model is the TorchScript module logged with ``mlflow.pytorch.log_model``, so that
loading it (``mlflow.pytorch.load_model``, ``mlflow.pyfunc.load_model``, ``mlflow models
serve``) needs torch and mlflow but no stx code. Its signature is one unnamed float32 tensor
``B×3×H×W`` in [0, 1] (any batch and size) in, the stylised tensor of the same shape out.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

TORCHSCRIPT_FILE = "model.torchscript.pt"
ONNX_FILE = "model.onnx"
ONNX_INT8_FILE = "model.int8.onnx"
CALIBRATION_IMAGES = 32
"""How many training crops calibrate an int8 export's activation ranges (at most)."""
MODEL_NAME = "model"
"""Name of the logged MLflow model: ``runs:/<run id>/model``."""
EXAMPLE_SIZE = 64
"""Edge (px) of the input example traced by ONNX export and stored with the MLflow model."""


def example_input(size: int = EXAMPLE_SIZE) -> torch.Tensor:
    """A fixed ``1×3×size×size`` image in [0, 1] (a smooth gradient, no randomness)."""
    ramp = torch.linspace(0.0, 1.0, size)
    return torch.stack([ramp.view(1, -1).expand(size, size), ramp.view(-1, 1).expand(size, size),
                        (1 - ramp).view(1, -1).expand(size, size)]).unsqueeze(0).contiguous()


def script(model: nn.Module) -> torch.jit.ScriptModule:
    """``torch.jit.script`` of ``model`` on the CPU, in eval mode (its deprecation warning muted)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.script(model.cpu().eval())


def export_torchscript(model: nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(script(model), str(path))
    return path


def load_torchscript(path: str | Path, device: torch.device | str = "cpu") -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location=device).eval()


def export_onnx(model: nn.Module, path: Path) -> Path:
    """ONNX (opset of torch's dynamo exporter) with dynamic batch, height and width; input
    ``image``, output ``stylised``. The exporter's per-node metadata (Python stack traces, module
    paths) is dropped: it is most of a light model's file."""
    import onnx

    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    chatty = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir")]
    levels = [logger.level for logger in chatty]
    for logger in chatty:  # they log each graph rewrite at INFO
        logger.setLevel(logging.WARNING)
    try:
        torch.onnx.export(model.cpu().eval(), (example_input(),), str(path), dynamo=True, dynamic_shapes=(dims,),
                          input_names=["image"], output_names=["stylised"], verbose=False, external_data=False)
    finally:
        for logger, level in zip(chatty, levels):
            logger.setLevel(level)
    program = onnx.load(str(path))
    for node in [*program.graph.node, *(node for function in program.functions for node in function.node)]:
        del node.metadata_props[:]
        node.doc_string = ""
    onnx.save(program, str(path))
    return path


def export_onnx_int8(model: nn.Module, path: Path, calibration: Sequence[torch.Tensor]) -> Path:
    """Static int8 ONNX in QDQ form (ONNX Runtime and its mobile build run it; so do other int8 runtimes
    that read QDQ): the fp32 export of :func:`export_onnx`, pre-processed (shapes inferred, batch norm
    folded into the convolutions), its activations' ranges calibrated on ``calibration`` (``1×3×H×W``
    images in [0, 1], e.g. training crops), weights int8 per output channel, activations uint8."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calibration:
        raise ValueError("an int8 export needs calibration images")

    class Images(CalibrationDataReader):
        def __init__(self) -> None:
            self.images = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            image = next(self.images, None)
            return None if image is None else {"image": image.detach().float().cpu().numpy()}

    with tempfile.TemporaryDirectory() as folder:
        fp32, prepared = Path(folder) / "fp32.onnx", Path(folder) / "prepared.onnx"
        export_onnx(model, fp32)
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(path), Images(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return path


FORMATS = {
    "torchscript": (TORCHSCRIPT_FILE, lambda model, path, calibration: export_torchscript(model, path)),
    "onnx": (ONNX_FILE, lambda model, path, calibration: export_onnx(model, path)),
    "onnx_int8": (ONNX_INT8_FILE, export_onnx_int8),
}
"""``trainer.export`` choices: file name and writer (model, path, calibration images) of each format."""


def export_file(model: nn.Module, folder: Path, kind: str, calibration: Sequence[torch.Tensor] = ()) -> Path:
    """Write ``model`` in format ``kind`` (a key of :data:`FORMATS`) into ``folder``; ``calibration``:
    ``1×3×H×W`` images an int8 format calibrates on."""
    name, write = FORMATS[kind]
    return write(model, folder / name, calibration)


class OnnxModel:
    """An exported ONNX model run by ONNX Runtime (CUDA when ``device`` is CUDA and available):
    called like the torch model, ``B×3×H×W`` float tensor in, same shape out (on the input's device)."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu") -> None:
        import onnxruntime

        wanted = ["CUDAExecutionProvider"] if torch.device(device).type == "cuda" else []
        providers = [p for p in wanted if p in onnxruntime.get_available_providers()] + ["CPUExecutionProvider"]
        self.session = onnxruntime.InferenceSession(str(path), providers=providers)
        self.input = self.session.get_inputs()[0].name

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        (output,) = self.session.run(None, {self.input: image.detach().float().cpu().numpy()})
        return torch.from_numpy(output).to(image.device)


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    # unnamed: a named input makes pyfunc hand the model a dict, which the pytorch flavour refuses
    image = TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1))
    return ModelSignature(inputs=Schema([image]), outputs=Schema([image]))


@contextlib.contextmanager
def tracking_uri_set(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI (and ``$MLFLOW_TRACKING_URI``, which it sets for subprocesses)
    is ``uri`` inside the block and what it was before after it."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        if before is None:  # set_tracking_uri(None) leaves the variable when MLflow's global was reset inside
            os.environ.pop("MLFLOW_TRACKING_URI", None)


def log_model(model: nn.Module, run_id: str, tracking_uri: str, registered_name: str | None = None) -> str:
    """Log ``model`` (scripted) to run ``run_id`` as the MLflow model ``model``, registered as
    ``registered_name`` when given; returns the model's URI."""
    import mlflow

    # MLflow warns that the "pickle" format can run code when loaded; a scripted module is saved as
    # a TorchScript archive, which stx loads with torch.jit.load only (stx.fast.stylize.load_model)
    flavour_log = logging.getLogger("mlflow.pytorch")
    level = flavour_log.level
    flavour_log.setLevel(logging.ERROR)
    try:
        with tracking_uri_set(tracking_uri), mlflow.start_run(run_id=run_id, log_system_metrics=False), \
                warnings.catch_warnings():
            # MLflow loads the model back to check the input example, with torch.load, which warns that it
            # dispatches to torch.jit.load, which torch has deprecated: neither is the user's concern
            warnings.filterwarnings("ignore", "'torch.load' received a zip file", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            info = mlflow.pytorch.log_model(
                script(model), name=MODEL_NAME, signature=signature(), input_example=example_input().numpy(),
                registered_model_name=registered_name, serialization_format="pickle",
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            )
    finally:
        flavour_log.setLevel(level)
    return info.model_uri
