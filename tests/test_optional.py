"""Optional dependencies fail with a message that says what to install."""

from __future__ import annotations

import sys

import pytest

from erc_distill.optional import optional_import


def test_present_module_imports():
    assert optional_import("json").dumps([1]) == "[1]"


def test_missing_module_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # a None entry makes the import fail
    with pytest.raises(ImportError, match=r'pip install "erc-distill\[tensorrt\]"'):
        optional_import("tensorrt")


def test_torchvision_hint_is_specific(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(ImportError, match=r"torch==2.14.1 torchvision==0.29.1"):
        optional_import("torchvision")
