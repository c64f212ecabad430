"""What a training step is made of, pure (no Ray): the Ray Train and Tune shells are
`panseg.train_loop` and `panseg.tune_search`.

- `model`: the nnU-Net default 3D U-Net and the planning of its strides
- `losses`: class-weighted soft Dice + cross-entropy and deep supervision
- `sampling`: label-centred patch sampling from the preprocessed store
- `augment`: nnU-Net's augmentations, batched in torch, every random draw replayable
- `checkpoint`: checkpoints of plain tensors and numbers, loaded with `weights_only=True`
- `parts`: the pieces the loop is assembled from (local `Session`, model, loss, optimiser, schedule,
  validation by sliding window)
- `init_from`: a new run starting from another model's weights, heads resized (`train.init_from`)
- `snapshots`: the training clock over resumes, and the models kept at training minutes
- `progress`: the one line per epoch, and a driver-side follower of RUN/metrics.jsonl
"""
