"""Whole-case prediction, pure (no Ray): the Ray Data shell over a folder is `panseg.infer`.

- `predictor`: a CT in its own grid in, a mask in the same grid out (`load_predictor`, `predict_case`)
- `sliding_window`: sliding-window logits of one preprocessed volume (Gaussian-weighted)
- `resource_monitor`: peak host and GPU memory and the FLARE GPU memory-time area of a case
- `nnunet_model`, `nnunet_preprocess`, `nnunet_resample`, `nnunet_predict`: an nnU-Net v2 model folder
  (plans, folds, weights) predicted with its own preprocessing and export (`panseg.infer_nnunet` is its shell)
"""
