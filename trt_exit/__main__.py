"""``python -m trt_exit``: the same as ``trt-exit``."""

from trt_exit.cli import entrypoint

if __name__ == "__main__":
    entrypoint()
