"""Serving early-exit models through NVIDIA Triton Inference Server.

* :mod:`~trt_exit.serving.model_io`: the model's Triton inputs and outputs (from the manifest)
  and the one function both servers call: a list of requests in, one executor batch, one result
  (or error) per request out.
* :mod:`~trt_exit.serving.pytriton_server`: ``trt-exit serve`` (PyTriton).
* :mod:`~trt_exit.serving.repository`: ``trt-exit triton-repo``, a model repository for a stock
  ``tritonserver``; :mod:`~trt_exit.serving.triton_model` is its Python-backend ``model.py``.
* :mod:`~trt_exit.serving.client`: an executor that sends batches to a server, for pipelines.

The serving layer adapts; the executor computes. See docs/serving.md.
"""
