"""One rank of a two-rank DeepSpeed ZeRO-3 LoRA save on CPU (gloo), for test_patch_offload_save.py.

    python tests/zero3_worker.py ROOT OUT_DIR RANK WORLD_SIZE PORT

Builds the tiny LoRA engine of ``ROOT`` (an openrlhf tree) through the strategy's own ``prepare``
and calls the real ``DeepspeedStrategy.save_model`` into OUT_DIR on every rank, as OpenRLHF does.
Rank 0 also writes the adapter weights it started from to OUT_DIR/../expected.pt. Same stand-ins
as the tests: flash-attn's CUDA extension, and ``torch.cuda.synchronize`` as a no-op on CPU; and
DeepSpeed's async all-gathers are completed one by one (``conftest.complete_async_gathers``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(root: Path, out: Path, rank: int, world_size: int, port: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0"
    )
    import conftest

    sys.modules.setdefault("flash_attn_2_cuda", conftest._MissingKernel("flash_attn_2_cuda"))
    import deepspeed
    import torch

    torch.cuda.synchronize = lambda *args, **kwargs: None
    conftest.complete_async_gathers()
    deepspeed.init_distributed(dist_backend="gloo")
    from test_patch_offload_save import build_engine, tiny_tokenizer

    _, strategy, actor, expected = build_engine(root)
    strategy.save_model(actor, tiny_tokenizer(), str(out))
    if rank == 0:
        torch.save(expected, out.parent / "expected.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
