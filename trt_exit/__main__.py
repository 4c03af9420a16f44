"""``python -m trt_exit``: the same as ``trt-exit``."""

if __name__ == "__main__":
    try:
        from trt_exit.cli import entrypoint
    except KeyboardInterrupt:  # Ctrl-C in the first moments: no traceback
        import sys

        print("trt-exit: interrupted", file=sys.stderr)
        sys.exit(130)
    entrypoint()
