/*
 * Stand-ins for the native entry points the TensorRT Python bindings link against
 * (libnvinfer, libnvinfer_plugin, libnvonnxparser), so that `import tensorrt_bindings` succeeds
 * on a machine without TensorRT. Found with `nm -D --undefined-only tensorrt.so` on the
 * tensorrt-cu12-bindings 10.3.0 and tensorrt-cu13-bindings 11.4.0.106 wheels.
 *
 * The API conformance tests only inspect attributes and signatures: nothing may call these.
 * Each one returns "no object" / failure, so an accidental call fails instead of pretending.
 */
#include <stddef.h>

void *createInferBuilder_INTERNAL(void *logger, int version) { return NULL; }
void *createInferRefitter_INTERNAL(void *engine, void *logger, int version) { return NULL; }
void *createInferRuntime_INTERNAL(void *logger, int version) { return NULL; }
void *createNvOnnxParser_INTERNAL(void *network, void *logger, int version) { return NULL; }
void *createNvOnnxParserRefitter_INTERNAL(void *refitter, void *logger, int version) { return NULL; }
void *getBuilderPluginRegistry(int capability) { return NULL; }
void *getPluginRegistry(void) { return NULL; }
int initLibNvInferPlugins(void *logger, const char *name_space) { return 0; }
int getNvOnnxParserVersion(void) { return 0; }
int getInferLibVersion(void) { return 0; }
