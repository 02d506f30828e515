"""Media for the audio (and later visual) branch: decoding, resampling, corpus clip conventions.

Importing this package costs numpy only; soundfile, soxr and PyAV (the ``audio`` extra) are
imported when a clip is decoded.
"""

from erc_distill.media.audio import (
    TARGET_RATE,
    AudioClip,
    MediaError,
    MediaSource,
    audio_from_pcm16,
    load_audio,
    resample,
    to_mono,
)
from erc_distill.media.clips import MediaReport, iter_turn_audio, load_turn_audio, locate_clip, resolve_media

__all__ = [
    "TARGET_RATE", "AudioClip", "MediaError", "MediaReport", "MediaSource", "audio_from_pcm16", "load_audio",
    "iter_turn_audio", "load_turn_audio", "locate_clip", "resample", "resolve_media", "to_mono",
]
