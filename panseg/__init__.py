"""panseg: whole-body pan-cancer CT lesion segmentation ("Crop and Segment", FLARE 2024) on Ray."""

__version__ = "0.1.0"
