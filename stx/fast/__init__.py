"""Feed-forward stylisers: :mod:`~stx.fast.transformer` (the network), :mod:`~stx.fast.data`
(the content folder), :mod:`~stx.fast.train` (``stx train``), :mod:`~stx.fast.export` (TorchScript,
ONNX and the MLflow model), :mod:`~stx.fast.stylize` (``stx stylize``) and :mod:`~stx.fast.serve`
(``stx serve``)."""
