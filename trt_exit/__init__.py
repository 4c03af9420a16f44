"""trt_exit: multi-exit Vision Transformers on NVIDIA Jetson with TensorRT."""

__version__ = "0.1.0"
