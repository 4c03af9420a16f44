"""The CUDA executor's strategies, one module each, over one shared :class:`~.chain.Chain`.

* :mod:`.chain`: the executor's stream, buffers, gate kernels and enqueue steps.
* :mod:`.graph`: the whole chain as one CUDA graph with nested conditional IF nodes.
* :mod:`.poll`: stages enqueued one by one, the host waits on a mapped flag after each gate.
* :mod:`.eager`: the plain host loop (the reference), and every exit at once.

The public API is :mod:`trt_exit.runtime.cuda_executor`.
"""
