"""On-robot inference: an exported bundle and a streaming recognizer.

Needs only onnxruntime, tokenizers and numpy (no torch, transformers or Lightning), so it runs on
the robot's computer with a small install.
"""

from erc_distill.runtime.audio_bundle import AudioBundle, open_bundle
from erc_distill.runtime.bundle import Bundle, BundleTokenizer
from erc_distill.runtime.stream import Prediction, StreamingRecognizer

__all__ = ["AudioBundle", "open_bundle", "Bundle", "BundleTokenizer", "Prediction", "StreamingRecognizer"]
