"""Runtime: backends, executor, policies and threshold tuning."""

#: Samples per executor run when a large input is run in chunks (``trt-exit run --chunk``,
#: ``Executor.run_chunks``). Here, not in the executor, so the CLI's help imports no numpy.
DEFAULT_CHUNK = 1024
#: Confidence level at which ``trt-exit tune`` and the demo check the accuracy floor over the
#: tuning split's sampling noise (see :mod:`trt_exit.runtime.tuning`).
DEFAULT_FLOOR_CONFIDENCE = 0.95
