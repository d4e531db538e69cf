"""Checkpoint handling in three layers: ``files`` (reading and writing files safely), ``layout``
(what a state_dict holds: key layout, variant, class count) and ``load`` (putting weights into a
model, converting effdet / official-TF layouts through :mod:`efficientdet.convert`).
``efficientdet.convert`` sits between ``layout`` and ``load``."""
