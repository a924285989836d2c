"""The torch engine: everything that turns images into a stylised image, with no Hydra, OmegaConf
or MLflow (``tests/engine/test_layers.py`` checks it), usable as a library.

Images are float tensors in [0, 1], ``B×3×H×W``.

- :mod:`~stx.engine.image`: reading, resizing and writing images and masks;
  :mod:`~stx.engine.inputs`: a job's input files (content, styles, init image, guided regions' masks),
  checked from their headers, then decoded once.
- :mod:`~stx.engine.encoders`: multi-layer encoders (VGG16/19, AlexNet, ResNet-50, EfficientNet-B0)
  and their weights; :mod:`~stx.engine.hed`: HED's trained VGG16, offline.
- :mod:`~stx.engine.losses`: the loss terms and the perceptual objective that sums them;
  :mod:`~stx.engine.color`: colour control.
- :mod:`~stx.engine.plan`: one memory plan (the estimate, the fit check and the tiling decision);
  :mod:`~stx.engine.tiling`: tiled objectives for images that do not fit.
- :mod:`~stx.engine.optim`: the optimisation loop (pyramid levels, bounds, rise guard, checkpoints);
  :mod:`~stx.engine.lbfgs`: stx's L-BFGS.
- :mod:`~stx.engine.judge`: the quality metrics (``eval/*``) a run is scored by.

A new loss is one class in :mod:`~stx.engine.losses` plus one YAML file in ``conf/loss/``; a new
encoder is one function in :mod:`~stx.engine.encoders` plus one file in ``conf/encoder/``.
"""
