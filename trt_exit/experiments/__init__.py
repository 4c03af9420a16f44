"""Experiments that reproduce the comparisons of the papers this project implements.

* :mod:`trt_exit.experiments.exit_families`: exit families x exit positions on an image
  classification dataset (digits), CopycatSL-ViT against SL-ViT, SL-ViT on a CNN backbone;
* :mod:`trt_exit.experiments.av_crowd`: audiovisual crowd counting with exits that fuse audio
  and vision.

``trt-exit experiment`` runs them; each writes ``results.json`` and plots into one directory.
"""
