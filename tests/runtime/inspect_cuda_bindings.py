"""Run as a script by test_cuda_bindings_versions.py, in ``python -S`` with one cuda-bindings
version first on ``sys.path``: resolves attribute chains of ``cuda.bindings.{driver,runtime,
nvrtc}`` and prints, as JSON, the version and per chain either ``null`` (missing) or the
parameter names of the callable it names (``[]`` for a non-callable, ``"?"`` when the signature
cannot be read). Only attributes are read: nothing calls into the CUDA libraries.
"""

import inspect
import json
import sys

site, chains = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, site)

import cuda.bindings  # noqa: E402
from cuda.bindings import driver, nvrtc, runtime  # noqa: E402

roots = {"driver": driver, "runtime": runtime, "nvrtc": nvrtc}
found = {}
for chain in chains:
    root, *attrs = chain.split(".")
    obj = roots[root]
    for attr in attrs:
        obj = getattr(obj, attr, None)
        if obj is None:
            break
    if obj is None:
        found[chain] = None
    elif callable(obj) and not isinstance(obj, type):
        try:
            found[chain] = list(inspect.signature(obj).parameters)
        except (TypeError, ValueError):
            found[chain] = "?"
    else:
        found[chain] = []
print(json.dumps({"version": cuda.bindings.__version__, "found": found}))
