"""Checkpoints, read top-down: ``files`` (reading and writing files safely) → ``layout`` (what a
state_dict holds: its key layout, variant, class count) → ``layouts`` (one adapter per key layout:
this project, Yet-Another-EfficientDet-Pytorch, effdet, official TF; each registered once and
asked downward) → ``load`` (putting the adapter's weights into a model). ``signature`` reads
architecture features from tensor shapes for any layout. Nothing here imports
:mod:`efficientdet.convert` (the conversion commands) or :mod:`efficientdet.zoo` (released weights
by name), which sit above it."""
