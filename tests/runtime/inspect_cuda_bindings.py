"""Run as a script by test_cuda_bindings_versions.py, in ``python -S`` with one cuda-bindings
version first on ``sys.path``: resolves attribute chains of ``cuda.bindings.{driver,runtime,
nvrtc}`` and prints, as JSON, the version and per chain either ``null`` (missing) or the
parameter names of the callable it names (``[]`` for a non-callable, ``"?"`` when the signature
cannot be read); for struct types, which of the attribute paths the code reads exist on a fresh
instance; and whether the conditional node parameters can be filled in as
``trt_exit/runtime/cuda/graph.py`` does. Structs are built on the host: nothing calls into the
CUDA libraries.
"""

import inspect
import json
import sys

site, chains, structs = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
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

def resolve(obj, path):
    for attr in path.split("."):
        if not hasattr(obj, attr):
            return False
        obj = getattr(obj, attr)
    return True


struct_paths = {}
for chain, paths in structs.items():
    root, name = chain.split(".")
    instance = getattr(roots[root], name)()
    struct_paths[chain] = {path: resolve(instance, path) for path in paths}

try:  # graph.py's IF node, with null handle and context
    params = driver.CUgraphNodeParams()
    params.type = driver.CUgraphNodeType.CU_GRAPH_NODE_TYPE_CONDITIONAL
    params.conditional.handle = driver.CUgraphConditionalHandle(0)
    params.conditional.type = driver.CUgraphConditionalNodeType.CU_GRAPH_COND_TYPE_IF
    params.conditional.size = 1
    params.conditional.ctx = driver.CUcontext(0)
    conditional_params = None if int(params.conditional.size) == 1 else "size did not stick"
except Exception as exc:  # noqa: BLE001  reported to the test
    conditional_params = f"{type(exc).__name__}: {exc}"

print(json.dumps({"version": cuda.bindings.__version__, "found": found,
                  "struct_paths": struct_paths, "conditional_params": conditional_params}))
