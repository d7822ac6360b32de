"""Data-parallel fine-tuning of the re-ranker under `torchrun` (DDP): one process per GPU or CPU.

    torchrun --standalone --nproc_per_node=2 -m services.updater.ddp_train \\
        --pairs pairs.jsonl --base <model dir> --out <dir>

Every rank reads the same pairs file (JSON lines with `user_text`, `item_text`, `label`, e.g. on
a shared volume), trains its shard through `model.training.train` (which wraps the model in
DistributedDataParallel when a process group is up), and rank 0 alone writes the result to
`--out`. The backend is NCCL when the model runs on CUDA, gloo on CPU. Without torchrun's
environment (`RANK`, `WORLD_SIZE`, ...) it trains in one process, exactly like the updater does.

`--rank-report DIR` makes every rank write `rank<N>.json` (its shard, steps, loss and a SHA-256
of its final weights): identical hashes across ranks show that the gradients were synchronised.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from model.reranker import CrossEncoderReranker
from model.training import Pair, TrainParams, train

log = logging.getLogger("freshrec.ddp_train")


def read_pairs(path: Path) -> list[Pair]:
    """Pairs from a JSON-lines file.

    Raises:
        ValueError: a line lacks `user_text`, `item_text` or `label`, or the file has no pairs.
    """
    pairs = []
    with path.open() as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            try:
                pairs.append(
                    Pair(str(row["user_text"]), str(row["item_text"]), float(row["label"]))
                )
            except KeyError as exc:
                raise ValueError(f"{path}:{number}: missing field {exc.args[0]!r}") from exc
    if not pairs:
        raise ValueError(f"{path} holds no pairs")
    return pairs


def write_pairs(pairs: Sequence[Pair], path: Path) -> Path:
    """Write pairs as JSON lines (the input `read_pairs` and this entry point take)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for pair in pairs:
            row = {"user_text": pair.user_text, "item_text": pair.item_text, "label": pair.label}
            handle.write(json.dumps(row) + "\n")
    return path


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over the state dict (sorted keys, fp32 bytes): equal across ranks iff in sync."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m services.updater.ddp_train", description=__doc__
    )
    parser.add_argument("--pairs", type=Path, required=True, help="JSON-lines training pairs.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--base", type=Path, help="Re-ranker directory to start from.")
    source.add_argument("--tiny", action="store_true", help="A tiny random BERT (tests).")
    parser.add_argument("--out", type=Path, required=True, help="Where rank 0 saves the model.")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--max-length", type=int, default=64, help="Tokens per pair.")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32, help="Pairs per rank per step.")
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--freeze-layers", type=int, default=4)
    parser.add_argument(
        "--frozen-eval", action="store_true", help="Frozen layers in eval mode (TrainParams)."
    )
    parser.add_argument("--cpu-dtype", choices=["auto", "fp32", "bf16"], default="fp32")
    parser.add_argument("--max-seconds", type=float, default=None)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--rank-report", type=Path, default=None, help="Per-rank JSON reports.")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Train (data-parallel under torchrun), save on rank 0; return the exit status."""
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    device_pref = args.device
    if device_pref == "auto":
        device_pref = "cuda" if torch.cuda.is_available() else "cpu"
    if distributed:
        if device_pref == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if device_pref == "cuda" else "gloo")
    try:
        rank = torch.distributed.get_rank() if distributed else 0
        world = torch.distributed.get_world_size() if distributed else 1
        pairs = read_pairs(args.pairs)
        if args.tiny:
            tiny = CrossEncoderReranker.tiny(seed=args.seed, max_length=args.max_length)
            reranker = CrossEncoderReranker(
                tiny.model, tiny.tokenizer, args.max_length, torch.device(device_pref)
            )
        else:
            reranker = CrossEncoderReranker.from_pretrained(
                args.base, args.max_length, device_pref, args.cpu_dtype, seed=args.seed
            )
        params = TrainParams(
            learning_rate=args.learning_rate,
            epochs=args.epochs,
            batch_size=args.batch_size,
            freeze_layers=args.freeze_layers,
            frozen_eval=args.frozen_eval,
            max_seconds=args.max_seconds,
            cpu_dtype=args.cpu_dtype,
            seed=args.seed,
        )
        report = train(reranker, pairs, params)
        if rank == 0:
            reranker.save(args.out)
        if args.rank_report is not None:
            args.rank_report.mkdir(parents=True, exist_ok=True)
            out: dict[str, Any] = {
                "rank": rank,
                "world_size": world,
                "backend": torch.distributed.get_backend() if distributed else None,
                "steps": report.steps,
                "examples_processed": report.examples_processed,
                "final_loss": report.final_loss,
                "weights_sha256": weights_sha256(reranker.model),
            }
            (args.rank_report / f"rank{rank}.json").write_text(json.dumps(out))
        log.info(
            "rank %d/%d: %d steps, %d pairs (all ranks), loss %.4f",
            rank,
            world,
            report.steps,
            report.examples_processed,
            report.final_loss,
        )
        if distributed:
            torch.distributed.barrier()  # nobody exits (and tears the group down) before rank 0 saved
    finally:
        if distributed:
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
