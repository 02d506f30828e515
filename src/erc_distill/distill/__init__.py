"""Distillation: loss terms, the weighted objective, the teacher-output cache, the Lightning module."""
