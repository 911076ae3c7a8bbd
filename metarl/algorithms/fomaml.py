"""First-order MAML (Finn et al. 2017, sec. 5.2): MAML with the inner gradients treated as
constants, so the meta-gradient is the query gradient at φ, applied to θ. No second-order
terms, hence no Hessian-vector products: cheaper, and on Omniglot nearly as accurate (the paper:
98.3% vs 98.7% at 5-way 1-shot). Everything else is MAML's (supervised) or MAML-TRPO's (meta-RL)."""
from __future__ import annotations

from ..registry import algorithm
from .maml import MAML
from .maml_trpo import MAMLTRPO


@algorithm("fomaml")
class FOMAML(MAML):
    first_order = True


@algorithm("fomaml", kinds=("rl",))
class FOMAMLTRPO(MAMLTRPO):
    """First-order MAML-TRPO: the outer gradient and Fisher products skip the inner step's curvature."""
    first_order = True
