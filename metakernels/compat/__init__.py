"""Drop-in shims with the interfaces existing research code already uses, running on metakernels' ops."""

from .pcgrad_optimizer import PCGrad

__all__ = ["PCGrad"]
