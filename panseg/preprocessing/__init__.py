"""Preprocessing of one case, pure (no Ray): the Ray Data shell over a cohort is `panseg.data_pipeline`.

- `case`: read, validate, crop, resample, clip, fuse labels, sample class locations (`preprocess_case`)
- `crop`: the crop of "Crop and Segment", the box around the largest bright component (`choose_crop`)
- `coarse_box`: the box of a mask's largest component decided on a coarse grid, exactly cc3d's (`crop_method: body`)
- `resample`: a `Volume` onto another voxel grid, honouring its physical geometry
"""
