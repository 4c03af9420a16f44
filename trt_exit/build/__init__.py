"""TensorRT engines from the stage graphs, built on the target device.

Engines are not portable across devices or TensorRT versions, so ``trt-exit build`` runs on the
Jetson itself (JetPack 6.1/6.2: TensorRT 10.3; JetPack 7.2.2+: TensorRT 11.4). The network is
built *strongly typed* from the FP32, FP16 or INT8 (Q/DQ) ONNX graph of each stage, so precision
comes from the graph alone, the same way on both versions (TensorRT 11 has no FP16/INT8 builder
flags).

* :mod:`.trt_api`: the one place TensorRT is imported, and the list of every TensorRT name this
  package uses (checked against the real 10.3 and 11.4 bindings by ``pytest -m trt_api``).
* :mod:`.config`: build settings (batch profile, workspace, DLA, version compatibility).
* :mod:`.preflight`: checks of an ONNX graph that need no TensorRT.
* :mod:`.target`: the TensorRT version and GPU an engine is for, and the engine cache key.
* :mod:`.steps`: Polygraphy-style steps (``NetworkFromOnnxPath``, ``EngineBytesFromNetwork``,
  ``SaveEngine``) and their plain-function twins.
* :mod:`.builder`: every stage of a manifest, cached by key, recorded in the manifest.
* :mod:`.doctor`: environment report and the TensorRT-vs-ONNX-Runtime self-test.
"""
