"""Distributed versions of metakernels' ops (torch.distributed): PCGrad over sharded task gradients."""

from .pcgrad import pcgrad, shard_columns

__all__ = ["pcgrad", "shard_columns"]
