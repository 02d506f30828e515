"""Serving exported bundles: the robot-facing inference server (``app``, ``batcher``, ``settings``;
needs the ``serve`` extra: ``pip install "erc-distill[serve]"``).

Nothing is imported here, so that importing one module does not pull in the web stack."""
