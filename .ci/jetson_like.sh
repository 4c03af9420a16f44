#!/usr/bin/env bash
# CI, Jetson-like: the environment Dockerfile.jetson builds on a Jetson, with only the NVIDIA
# elements missing (their software twins are tested instead), built from scratch here:
#   * Debian's system OpenCV (built with GStreamer), the GStreamer plugin sets, gst-rtsp-server
#     with its Python bindings, PulseAudio with ALSA's pulse plugin, PortAudio;
#   * a venv from Debian's /usr/bin/python3 with --system-site-packages and numpy<2;
#   * the dependency versions Dockerfile.jetson's pip line resolves to on Python 3.10 aarch64
#     (checked by a pip dry run for that platform: it must resolve without conflicts).
# Then the pipeline tests run there with TRT_EXIT_REQUIRE_JETSON_IO=1: a GStreamer, RTSP or
# PulseAudio test that would skip fails instead.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
work=$(mktemp -d /tmp/trt_exit_jetson_like.XXXXXX)
# Deleting the venv (torch: ~36,000 files) took 80 s on the shared CI disk: do it in the
# background, at idle I/O priority, instead of holding up CI.
trap '(ionice -c3 rm -rf "$work" >/dev/null 2>&1 &)' EXIT
start=$SECONDS

packages=(python3-venv python3-opencv python3-gi gir1.2-gst-rtsp-server-1.0
  gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good
  gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav gstreamer1.0-rtsp
  pulseaudio pulseaudio-utils libasound2-plugins libportaudio2)
installed=$(dpkg-query -W -f='${Status}\n' "${packages[@]}" 2>/dev/null \
  | grep -c "install ok installed" || true)
if [ "$installed" -eq "${#packages[@]}" ]; then
  echo "Debian packages: already installed"
else
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  apt_install() {
    $sudo apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=600 "${packages[@]}" \
      > "$work/apt.log" 2>&1
  }
  apt_install || { $sudo apt-get update -qq -o DPkg::Lock::Timeout=600 && apt_install; } \
    || { tail -20 "$work/apt.log"; exit 1; }
  echo "Debian packages: installed in $((SECONDS - start)) s"
fi

/usr/bin/python3 -m venv --system-site-packages "$work/venv"
py="$work/venv/bin/python"

# Dockerfile.jetson's pip requirements, read from the Dockerfile itself (the line after TORCH).
mapfile -t requirements < <("$py" - "$root/Dockerfile.jetson" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
block = text.split("pip install ${TORCH_INSTALL}", 1)[1].split("pip install --no-deps", 1)[0]
requirements = re.findall(r'"([^"]+)"', block)
# `pip install --no-deps .` follows: every runtime dependency of setup.py but torch must be here.
setup = open(sys.argv[1].replace("Dockerfile.jetson", "setup.py")).read()
needed = re.findall(r'"([A-Za-z0-9_.-]+)[<>=!~; ]', setup.split("install_requires=[", 1)[1].split("]", 1)[0])
listed = {re.split(r"[<>=!~; \[]", r, maxsplit=1)[0].lower() for r in requirements}
missing = [n for n in needed if n.lower() not in listed and n != "torch"]
if missing:
    sys.exit(f"Dockerfile.jetson's pip line lacks setup.py's {', '.join(missing)}")
print("\n".join(requirements))
PY
)
[ "${#requirements[@]}" -ge 5 ] || { echo "cannot read the pip line of Dockerfile.jetson"; exit 1; }
platforms=()
for tag in manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 \
    manylinux_2_26 manylinux_2_24 manylinux_2_17 manylinux2014; do
  platforms+=(--platform "${tag}_aarch64")
done
t0=$SECONDS
"$py" -m pip install -q --dry-run --ignore-installed --target "$work/dry-run" \
  --report "$work/resolved.json" "${platforms[@]}" --python-version 3.10 --implementation cp \
  --only-binary=:all: "${requirements[@]}" 2> >(grep -v "is ignored: it is neither" >&2) \
  || { echo "Dockerfile.jetson's pip line does not resolve for Python 3.10 aarch64 (above)"; exit 1; }
"$py" - "$work/resolved.json" "$root/.ci/jetson-like-pins.txt" <<'PY'
import json, sys
resolved = {f"{i['metadata']['name']}=={i['metadata']['version']}"
            for i in json.load(open(sys.argv[1]))["install"]}
recorded = {line.strip() for line in open(sys.argv[2]) if line.strip() and not line.startswith("#")}
key = lambda pin: pin.split("==")[0].lower()
core = {key(p): p for p in resolved if key(p) in ("numpy", "onnx", "onnxruntime")}
print(f"Dockerfile.jetson on Python 3.10 aarch64 resolves without conflicts: {len(resolved)} "
      f"packages ({', '.join(sorted(core.values()))})")
if resolved != recorded:
    print("note: PyPI moved since .ci/jetson-like-pins.txt was recorded:",
          "now", sorted(resolved - recorded), "recorded", sorted(recorded - resolved))
PY
echo "dry run: $((SECONDS - t0)) s"

t0=$SECONDS
"$py" -m pip install -q -r "$root/.ci/jetson-like-pins.txt" torch==2.13.0 "pytest>=8"
"$py" -m pip install -q --no-deps -e "$root"
"$py" - <<'PY'
import cv2, numpy, onnxruntime, sys
assert cv2.__file__.startswith("/usr/lib/python3/"), f"not the system OpenCV: {cv2.__file__}"
assert numpy.__version__.startswith("1."), numpy.__version__
from trt_exit.pipelines.opencv_support import gstreamer_available
assert gstreamer_available(), "the system OpenCV has no GStreamer"
print(f"Jetson-like venv: Python {sys.version.split()[0]} (Debian), system OpenCV "
      f"{cv2.__version__} with GStreamer, numpy {numpy.__version__}, onnxruntime "
      f"{onnxruntime.__version__}")
PY
echo "venv: $((SECONDS - t0)) s"

t0=$SECONDS
TRT_EXIT_REQUIRE_JETSON_IO=1 "$py" -m pytest tests/pipelines -p no:cacheprovider -q -rs
echo "Jetson-like pipeline tests: $((SECONDS - t0)) s; all of it: $((SECONDS - start)) s"
