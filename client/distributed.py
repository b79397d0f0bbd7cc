"""Helpers for distributed (``torchrun``) training scripts; torch only, no transformers."""

from __future__ import annotations

import gc

import torch

__all__ = ["end_distributed"]


def end_distributed() -> None:
    """Tear the default process group down at the end of a distributed script; no-op without one.

    Call it after ``main()`` has returned (the Trainer or DDP model gone), on every rank::

        if __name__ == "__main__":
            main()
            end_distributed()

    Collects garbage (the Trainer and accelerate hold reference cycles to the DDP reducer, which
    holds the process group), waits at a barrier so no collective is still in flight on any rank,
    then destroys the group, whose gloo or NCCL threads are joined while the interpreter is whole.
    Left to interpreter exit, a gloo worker thread still freeing a finished collective's tensors
    can abort a run that succeeded ("terminate called without an active exception", SIGABRT) —
    seen in CI; destroying the group inside ``main`` while a DDP model is alive deadlocks instead.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
