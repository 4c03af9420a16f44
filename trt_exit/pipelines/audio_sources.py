"""Audio sources from URIs, a timestamped ring buffer, and frame/audio pairing.

Every video frame is paired with the audio window (``window_s``, 1 s for the crowd model) that
*ends at the frame's timestamp*. Audio arrives in blocks; :class:`AudioRingBuffer` keeps the
last few seconds with the session time of every sample, so the window for a frame is a slice.

=====================  ========  =============================================================
URI                    live      how
=====================  ========  =============================================================
``mic://default``      yes       PortAudio (sounddevice) default input; ``mic://2``: device 2,
                                 ``mic://USB``: the first input whose name contains "USB"
``alsa://hw:1,0``      yes       the PortAudio input whose name contains ``hw:1,0``
``file://clip.wav``    no        WAV (PCM 8/16/24/32-bit or float), mixed down to mono
``synthetic://crowd``  no        the synthetic crowd scene's sound (same seed = same crowd)
``none://``            no        silence (a video-only run of an audiovisual model)
=====================  ========  =============================================================

Live input is written into the ring buffer by the PortAudio callback with the capture time of
each block; offline input is read on demand up to the time asked for (media time, which starts
at 0 with the run). Samples stay at the source's rate; :func:`~trt_exit.pipelines.
audio_features.log_mel` resamples each window to the model's rate.

Rate: a microphone is opened at ``?rate=`` if given, else at the model's rate if the device
supports it, else at the device's default rate (and resampled), so a 44.1 or 48 kHz-only
microphone works with a 16 kHz model.
"""

from __future__ import annotations

import logging
import threading
import time
import wave
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from trt_exit.errors import ConfigError, require
from trt_exit.pipelines.base import Backoff, SessionClock, SourceError
from trt_exit.pipelines.uri import ResourceURI, parse_uri

log = logging.getLogger(__name__)


@dataclass
class AudioWindow:
    """The audio paired with one frame.

    Attributes:
        samples: (T,) float32 mono at ``sample_rate``, T = window_s * sample_rate.
        sample_rate: In Hz.
        end_s: Session time of the end of the window.
        missing_samples: Samples of the window with no audio (before the stream started, a
            dropout, a lost microphone, a late block), filled with zeros.
    """

    samples: np.ndarray
    sample_rate: int
    end_s: float
    missing_samples: int = 0

    @property
    def missing_ms(self) -> float:
        return 1e3 * self.missing_samples / self.sample_rate


class AudioRingBuffer:
    """The last ``capacity_s`` seconds of a mono stream, with the session time of each sample.

    The sample clock is trusted between blocks (sample ``i`` is at ``origin + i / rate``); a
    block whose timestamp is more than ``tolerance_s`` after where the stream should be marks a
    dropout and the gap is filled with zeros; one that is that much early (the audio clock runs
    faster than the system's) moves the origin, so the two clocks never drift apart by more than
    ``tolerance_s``. Thread-safe: the PortAudio callback writes while the main loop reads.

    Args:
        sample_rate: In Hz.
        capacity_s: Seconds kept (at least the longest window read).
        tolerance_s: Timestamp jitter ignored.
    """

    def __init__(self, sample_rate: int, capacity_s: float = 4.0, tolerance_s: float = 0.05):
        if sample_rate <= 0:
            raise ConfigError(f"sample rate must be positive, got {sample_rate}")
        self.sample_rate = int(sample_rate)
        self.capacity = int(round(capacity_s * sample_rate))
        self.tolerance_s = tolerance_s
        self._data = np.zeros(self.capacity, np.float32)
        self._written = 0  # samples written since the start (including zero-filled gaps)
        self._origin_s: float | None = None  # session time of sample 0
        self._lock = threading.Lock()
        #: Samples filled with zeros for dropouts.
        self.gap_samples = 0

    @property
    def end_s(self) -> float | None:
        """Session time just after the newest sample (None before the first block)."""
        with self._lock:
            if self._origin_s is None:
                return None
            return self._origin_s + self._written / self.sample_rate

    def _append(self, samples: np.ndarray) -> None:
        n = len(samples)
        if n >= self.capacity:
            samples = samples[-self.capacity:]
            self._written += n - self.capacity
            n = self.capacity
        start = self._written % self.capacity
        first = min(n, self.capacity - start)
        self._data[start:start + first] = samples[:first]
        self._data[:n - first] = samples[first:]
        self._written += n

    def write(self, samples: np.ndarray, start_s: float | None = None) -> None:
        """Appends a block of mono samples that began at session time ``start_s`` (None:
        right after the previous block)."""
        samples = np.asarray(samples, np.float32).reshape(-1)
        with self._lock:
            if self._origin_s is None:
                self._origin_s = 0.0 if start_s is None else float(start_s)
            elif start_s is not None:
                expected_s = self._origin_s + self._written / self.sample_rate
                drift_s = start_s - expected_s
                if drift_s > self.tolerance_s:
                    gap = int(round(drift_s * self.sample_rate))
                    self.gap_samples += gap
                    self._append(np.zeros(min(gap, self.capacity), np.float32))
                    self._written += max(0, gap - self.capacity)
                elif drift_s < -self.tolerance_s:
                    self._origin_s += drift_s
            self._append(samples)

    def window(self, end_s: float, duration_s: float) -> AudioWindow:
        """The ``duration_s`` seconds ending at session time ``end_s``; what the buffer does not
        hold (not yet arrived, too old, before the start) is zeros and counted as missing."""
        n = int(round(duration_s * self.sample_rate))
        out = np.zeros(n, np.float32)
        with self._lock:
            if self._origin_s is None:
                return AudioWindow(out, self.sample_rate, end_s, n)
            end = int(round((end_s - self._origin_s) * self.sample_rate))
            start = end - n
            lo = max(start, self._written - self.capacity, 0)
            hi = min(end, self._written)
            if hi > lo:
                idx = np.arange(lo, hi) % self.capacity
                out[lo - start:hi - start] = self._data[idx]
            missing = n - max(0, hi - lo)
        return AudioWindow(out, self.sample_rate, end_s, missing)


# --------------------------------------------------------------------------- sources


class AudioSource(ABC):
    """Audio for the frames of a run. Use it as a context manager (or call :meth:`close`).

    Attributes:
        uri: Where the audio comes from.
        live: Audio arrives in real time (microphones).
        sample_rate: Rate of the samples handed out, in Hz (known after :meth:`open`).
    """

    live = False

    def __init__(self, uri: ResourceURI):
        self.uri = uri
        self.sample_rate = 0

    @abstractmethod
    def open(self, clock: SessionClock, preferred_rate: int) -> None:
        """Opens the device or file; ``preferred_rate`` is the model's rate."""

    @abstractmethod
    def window(self, end_s: float, duration_s: float) -> AudioWindow:
        """The audio window ending at session time ``end_s``."""

    def close(self) -> None:
        """Releases the device or file (idempotent)."""

    def describe(self) -> dict[str, Any]:
        return {"uri": str(self.uri), "live": self.live, "sample_rate": self.sample_rate}

    def __enter__(self) -> "AudioSource":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class PulledAudioSource(AudioSource):
    """An offline source read block by block, on demand, into a ring buffer (media time)."""

    block_s = 0.1

    def open(self, clock: SessionClock, preferred_rate: int) -> None:
        self._clock = clock
        self._open(preferred_rate)
        self._buffer: AudioRingBuffer | None = None
        self._ended = False

    @abstractmethod
    def _open(self, preferred_rate: int) -> None:
        """Opens the file; sets :attr:`sample_rate`."""

    @abstractmethod
    def _read_block(self, t0_s: float, samples: int) -> np.ndarray | None:
        """``samples`` mono samples starting at media time ``t0_s`` (fewer at the end, None
        after it)."""

    def window(self, end_s: float, duration_s: float) -> AudioWindow:
        if self._buffer is None:
            self._buffer = AudioRingBuffer(self.sample_rate, max(4.0, 2 * duration_s + 1))
            self._buffer.write(np.zeros(0, np.float32), 0.0)
        block = max(1, int(round(self.block_s * self.sample_rate)))
        while not self._ended and self._buffer.end_s < end_s:
            t0_s = self._buffer.end_s
            samples = self._read_block(t0_s, block)
            if samples is None or len(samples) == 0:
                self._ended = True
                log.warning("%s: the audio ended at %.1f s; the rest of the run hears silence",
                            self.uri, t0_s)
                break
            self._buffer.write(samples)
        return self._buffer.window(end_s, duration_s)


class SilentAudioSource(PulledAudioSource):
    """``none://``: silence, for a video-only run of an audiovisual model."""

    def _open(self, preferred_rate: int) -> None:
        self.sample_rate = int(preferred_rate)
        log.warning("no audio input (none://): the model hears silence, so its audio cues are "
                    "missing and counts may be less accurate")

    def _read_block(self, t0_s: float, samples: int) -> np.ndarray:
        return np.zeros(samples, np.float32)


class SyntheticAudioSource(PulledAudioSource):
    """``synthetic://crowd?seed=0``: the synthetic crowd scene's sound."""

    def __init__(self, uri: ResourceURI):
        super().__init__(uri)
        if uri.location not in ("crowd", ""):
            raise ConfigError(f"{uri}: the synthetic audio source is synthetic://crowd")
        self.seed = uri.int_option("seed", 0)

    def _open(self, preferred_rate: int) -> None:
        from trt_exit.training.crowd_synth import CrowdSceneConfig, SyntheticCrowdStream

        config = CrowdSceneConfig()
        self._stream = SyntheticCrowdStream(self.seed, config)
        self.sample_rate = int(config.sample_rate)

    def _read_block(self, t0_s: float, samples: int) -> np.ndarray:
        t1_s = t0_s + samples / self.sample_rate
        audio = np.asarray(self._stream.audio(t0_s, t1_s), np.float32).reshape(-1)
        return audio

    def close(self) -> None:
        self._stream = None


class WavAudioSource(PulledAudioSource):
    """``file://clip.wav``: a WAV file (PCM or float), mixed down to mono."""

    def __init__(self, uri: ResourceURI):
        super().__init__(uri)
        self._wav: wave.Wave_read | None = None

    def _open(self, preferred_rate: int) -> None:
        path = self.uri.path
        if not path.is_file():
            raise SourceError(f"{self.uri}: no such audio file {path}")
        try:
            self._wav = wave.open(str(path), "rb")
        except (wave.Error, EOFError) as exc:
            raise SourceError(f"{self.uri}: not a readable WAV file ({exc}); convert it with "
                              f"ffmpeg -i IN -ac 1 -ar 16000 OUT.wav") from exc
        self._channels = self._wav.getnchannels()
        self._width = self._wav.getsampwidth()
        self.sample_rate = self._wav.getframerate()
        if self._width not in (1, 2, 3, 4) or self.sample_rate <= 0:
            raise SourceError(f"{self.uri}: unsupported WAV format ({self._width}-byte samples "
                              f"at {self.sample_rate} Hz)")

    def _read_block(self, t0_s: float, samples: int) -> np.ndarray | None:
        try:
            raw = self._wav.readframes(samples)
        except (wave.Error, EOFError) as exc:
            log.warning("%s: the WAV file is damaged after %.1f s (%s)", self.uri, t0_s, exc)
            return None
        if not raw:
            return None
        return _pcm_to_float(raw, self._width, self._channels)

    def close(self) -> None:
        if self._wav is not None:
            self._wav.close()
            self._wav = None


def _pcm_to_float(raw: bytes, width: int, channels: int) -> np.ndarray:
    """Interleaved little-endian PCM bytes to mono float32 in [-1, 1]."""
    usable = len(raw) - len(raw) % (width * channels)
    raw = raw[:usable]
    if width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v >= 1 << 23, v - (1 << 24), v)
        x = v.astype(np.float32) / float(1 << 23)
    else:
        x = np.frombuffer(raw, "<i4").astype(np.float32) / float(1 << 31)
    return x.reshape(-1, channels).mean(axis=1).astype(np.float32)


# --------------------------------------------------------------------------- microphones


def import_sounddevice():
    """Imports sounddevice; a missing package or a missing PortAudio library is a clear error."""
    try:
        return require("sounddevice", "audio", "live audio capture",
                       hint="It also needs the PortAudio library: sudo apt-get install "
                            "libportaudio2")
    except OSError as exc:  # the package is there, libportaudio is not
        raise SourceError(f"live audio capture needs the PortAudio library ({exc}): sudo "
                          f"apt-get install libportaudio2 (in the Jetson container it is "
                          f"installed)") from exc


class SoundDeviceAudioSource(AudioSource):
    """A microphone through PortAudio (``mic://``, ``alsa://``).

    The PortAudio callback stamps each block with its capture time (ADC time, mapped onto the
    session clock) and writes it into an :class:`AudioRingBuffer`. When the device stops
    delivering (unplugged), :meth:`window` reopens it with backoff while the run goes on; the
    frames in between get silence and report it as ``audio_missing_ms``.
    """

    live = True
    #: Seconds without a block before the microphone counts as lost.
    stall_s = 1.0
    #: Seconds an opened stream may take to deliver its first block (PulseAudio through ALSA's
    #: pulse plugin takes 0.8 s on an idle 2-core machine) before it counts as lost.
    start_s = 3.0

    def __init__(self, uri: ResourceURI, backoff: Backoff | None = None):
        super().__init__(uri)
        self.requested_rate = uri.int_option("rate")
        self.block_ms = uri.float_option("block_ms", 20.0)
        self.backoff = backoff or Backoff(give_up_s=None)
        self._stream = None
        self._buffer: AudioRingBuffer | None = None
        self._last_block_s = 0.0
        self._delivering = False
        self._retry_at_s = 0.0
        self._delays = None
        self.overflows = 0
        self.reopens = 0

    def _device(self, sd) -> int | str | None:
        location = self.uri.location
        if self.uri.scheme == "mic" and location in ("", "default"):
            try:
                sd.query_devices(kind="input")
            except sd.PortAudioError as exc:
                raise SourceError(
                    f"{self.uri}: PortAudio has no default input ({exc}): connect a microphone "
                    f"(arecord -l lists them; in a container pass --device /dev/snd), or where "
                    f"ALSA's default goes through PulseAudio check that it runs (pactl info) "
                    f"and PULSE_SERVER") from None
            return None
        if location.isdigit():
            return int(location)
        try:
            devices = sd.query_devices()
        except sd.PortAudioError as exc:
            raise SourceError(f"{self.uri}: PortAudio cannot list devices ({exc})") from exc
        inputs = [(i, d["name"]) for i, d in enumerate(devices) if d["max_input_channels"] > 0]
        for index, name in inputs:
            if location in name:
                return index
        listing = "; ".join(f"{i}: {n}" for i, n in inputs) or "none"
        hint = (" (ALSA's pulse device: is PulseAudio running? pactl info; PULSE_SERVER)"
                if "pulse" in location else "")
        raise SourceError(f"{self.uri}: no input device matching {location!r}{hint} (inputs: "
                          f"{listing}); list them with python -m sounddevice or arecord -l")

    def _pick_rate(self, sd, device, preferred_rate: int) -> int:
        candidates = [self.requested_rate] if self.requested_rate else []
        if not candidates:
            try:
                default = int(sd.query_devices(device, "input")["default_samplerate"])
            except (sd.PortAudioError, ValueError) as exc:
                raise SourceError(f"{self.uri}: cannot query the device ({exc})") from exc
            candidates = [preferred_rate, default, 48000, 44100, 16000]
        tried = []
        for rate in dict.fromkeys(candidates):
            try:
                sd.check_input_settings(device=device, channels=1, samplerate=rate,
                                        dtype="float32")
                return rate
            except (sd.PortAudioError, ValueError) as exc:
                tried.append(f"{rate} Hz ({exc})")
        raise SourceError(f"{self.uri}: the device accepts none of the sample rates tried: "
                          f"{'; '.join(tried)}. Pass one it supports, e.g. "
                          f"{self.uri.without_options()}?rate=48000 (arecord --dump-hw-params "
                          f"-D {self.uri.location} lists them)")

    @staticmethod
    def _refresh_devices(sd) -> None:
        """Makes PortAudio list the devices again. PortAudio enumerates them once, when it
        starts: a microphone plugged in (or a sound server started) later is invisible until
        then. Only called while this source has no stream open."""
        sd._terminate()
        sd._initialize()

    def open(self, clock: SessionClock, preferred_rate: int) -> None:
        sd = import_sounddevice()
        self._sd = sd
        self._clock = clock
        self._preferred_rate = preferred_rate
        try:
            device = self._device(sd)
            rate = self._pick_rate(sd, device, preferred_rate)
        except SourceError:
            # PortAudio's list may be stale: the device (or the sound server behind it) may
            # have appeared or gone since PortAudio started.
            self._refresh_devices(sd)
            device = self._device(sd)
            rate = self._pick_rate(sd, device, preferred_rate)
        if rate != preferred_rate:
            log.info("%s: capturing at %d Hz, resampled to the model's %d Hz", self.uri, rate,
                     preferred_rate)
        self.sample_rate = rate
        if self._buffer is None or self._buffer.sample_rate != rate:
            self._buffer = AudioRingBuffer(rate, capacity_s=4.0)
        try:
            self._stream = sd.InputStream(device=device, channels=1, samplerate=rate,
                                          dtype="float32",
                                          blocksize=int(rate * self.block_ms / 1000),
                                          callback=self._callback)
            self._stream.start()
        except sd.PortAudioError as exc:
            self._stream = None
            raise SourceError(f"{self.uri}: cannot open the microphone ({exc}); is it "
                              f"connected (arecord -l), and in a container is --device "
                              f"/dev/snd passed?") from exc
        self._last_block_s = clock.now_s()
        self._delivering = False

    def _callback(self, indata, frames, time_info, status) -> None:
        # Runs on PortAudio's thread: stamp the block with its capture time and store it.
        now_s = self._clock.now_s()
        latency_s = max(0.0, time_info.currentTime - time_info.inputBufferAdcTime)
        if status.input_overflow:
            self.overflows += 1
        self._buffer.write(indata[:, 0].copy(), now_s - latency_s)
        self._last_block_s = now_s
        self._delivering = True

    def _healthy(self, now_s: float) -> bool:
        return (self._stream is not None and self._stream.active
                and now_s - self._last_block_s < (self.stall_s if self._delivering
                                                  else self.start_s))

    def window(self, end_s: float, duration_s: float) -> AudioWindow:
        now_s = self._clock.now_s()
        if not self._healthy(now_s):
            self._recover(now_s)
        return self._buffer.window(end_s, duration_s)

    def _recover(self, now_s: float) -> None:
        """Tries to reopen a lost microphone, at most once per backoff delay; never raises."""
        if self._delays is None:
            log.warning("%s: the microphone stopped delivering audio; continuing with silence "
                        "while reconnecting", self.uri)
            self._delays = self.backoff.delays()
            self._retry_at_s = now_s
        if now_s < self._retry_at_s:
            return
        self._close_stream()
        try:
            self._refresh_devices(self._sd)  # a replugged device has a new PortAudio index
            self.open(self._clock, self._preferred_rate)
        except (SourceError, self._sd.PortAudioError) as exc:
            delay = next(self._delays, None)
            self._retry_at_s = now_s + (delay if delay is not None else float("inf"))
            log.debug("%s: reopen failed: %s", self.uri, exc)
            return
        self.reopens += 1
        self._delays = None
        log.warning("%s: microphone back", self.uri)

    def _close_stream(self) -> None:
        if self._stream is not None:
            try:
                self._stream.stop()
                self._stream.close()
            except self._sd.PortAudioError as exc:  # an unplugged device may refuse to stop
                log.debug("%s: closing the stream: %s", self.uri, exc)
            self._stream = None

    def close(self) -> None:
        if getattr(self, "_sd", None) is not None:
            self._close_stream()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "overflows": self.overflows, "reopens": self.reopens}


def open_audio_source(uri: str | ResourceURI) -> AudioSource:
    """The audio source for ``uri`` (not opened yet).

    Raises:
        ConfigError: A scheme that is not an audio source.
    """
    uri = parse_uri(uri) if isinstance(uri, str) else uri
    if uri.scheme == "synthetic":
        return SyntheticAudioSource(uri)
    if uri.scheme == "none":
        return SilentAudioSource(uri)
    if uri.scheme in ("mic", "alsa"):
        return SoundDeviceAudioSource(uri)
    if uri.scheme == "file":
        if uri.extension not in (".wav", ".wave"):
            raise ConfigError(f"{uri}: audio files must be WAV; convert with ffmpeg -i IN -ac 1 "
                              f"OUT.wav")
        return WavAudioSource(uri)
    raise ConfigError(f"{uri}: {uri.scheme}:// is not an audio source; use mic://default, "
                      f"alsa://hw:1,0, file://clip.wav, synthetic://crowd or none://")


def wait_for_audio(source: AudioSource, clock: SessionClock, duration_s: float,
                   timeout_s: float = 0.0) -> None:
    """Waits up to ``timeout_s`` for a live source to fill its first window (so the first
    frames of a run are not paired with silence)."""
    if not source.live or timeout_s <= 0:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        window = source.window(clock.now_s(), duration_s)
        if window.missing_samples == 0:
            return
        time.sleep(0.05)
