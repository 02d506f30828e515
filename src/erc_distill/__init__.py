"""erc-distill: teacher-student distillation for Emotion Recognition in Conversation (ERC).

Nothing is loaded at import time; see the subpackages:

- :mod:`erc_distill.data`: corpus readers, the context + prompt builder, data-set statistics;
- :mod:`erc_distill.report`: metrics (weighted F1 and friends);
- :mod:`erc_distill.pretrained`: where pretrained encoders and tokenizers come from.
"""

__version__ = "0.1.0"
