"""trt_exit: multi-exit Vision Transformers on NVIDIA Jetson with TensorRT."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
VERSION = {}
exec((ROOT / "trt_exit" / "__init__.py").read_text().split("\n\n")[-1], VERSION)  # __version__

setup(
    name="trt-exit",
    version=VERSION["__version__"],
    description="Multi-exit (early-exit) Vision Transformers on NVIDIA Jetson with TensorRT",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["trt_exit", "trt_exit.*"]),
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "onnx>=1.16",
        "onnxruntime>=1.18",
        "scikit-learn>=1.3",
        "safetensors>=0.4",
        "tqdm>=4.66",
        "matplotlib>=3.7",
        "filelock>=3.12",  # the manifest's lock (docs/trust.md)
    ],
    extras_require={
        # Tests; the timm adapter tests need timm (and with it torchvision).
        "dev": ["pytest>=8", "timm>=1.0", "opencv-python-headless>=4.8", "hypothesis>=6.100"],
        "timm": ["timm>=1.0"],
        # The CUDA executor: cuda-python (with NVRTC) and NVTX ranges for Nsight Systems, of the
        # driver's CUDA major version: cuda12 for CUDA 12.x drivers (JetPack 6, R550-R575),
        # cuda13 (= cuda) for CUDA 13 drivers (R580+, JetPack 7).
        "cuda": ["cuda-bindings[all]>=13,<14", "nvtx>=0.2"],
        "cuda12": ["cuda-bindings[all]>=12.6,<13", "nvtx>=0.2"],
        "cuda13": ["cuda-bindings[all]>=13,<14", "nvtx>=0.2"],
        # Live pipelines: video I/O (on a Jetson use JetPack's python3-opencv instead, which has
        # GStreamer) and microphones (sounddevice needs the PortAudio library: libportaudio2).
        "video": ["opencv-python-headless>=4.8"],
        "audio": ["sounddevice>=0.4"],
        # TensorRT engines: cuda-python everywhere; the tensorrt wheel on x86 only (on a Jetson
        # TensorRT comes with JetPack, see docs/tensorrt.md).
        "tensorrt": ["cuda-python>=12.6", "tensorrt>=10.3; platform_machine == 'x86_64'"],
        # Serving through NVIDIA Triton (trt-exit serve, triton-repo, count --server): PyTriton
        # bundles tritonserver with the Python backend and brings tritonclient; it needs numpy<2.
        "serve": ["nvidia-pytriton>=0.7", "numpy<2"],
    },
    entry_points={"console_scripts": ["trt-exit=trt_exit.cli:entrypoint"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
