"""Tiny random re-rankers shared by the unit tests."""

from __future__ import annotations

import torch

from model.reranker import CrossEncoderReranker


def split_reranker(joint: int = 1, seed: int = 3) -> CrossEncoderReranker:
    """A tiny split re-ranker (`joint` top layers) whose weights are spread: random tiny BERTs
    score everything alike, and differences should show."""
    model = CrossEncoderReranker.tiny(seed=seed, max_length=32, joint_layers=joint)
    with torch.no_grad():
        for p in model.model.parameters():
            p.mul_(4.0)
    return model
