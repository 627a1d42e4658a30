"""Adversarial robustness toolkit: attacks, adversarial training, evaluation.

>>> from pyeuler.robust import fgsm, pgd, cw, evaluate, train_epoch
>>> x_adv = pgd(model, x, y, eps=8/255, alpha=2/255, steps=10)
>>> evaluate(model, x_test, y_test, attacks=["fgsm", "pgd-20"], eps=[2/255, 8/255])
"""

from pyeuler.robust.attacks import ATTACKS, cw, default_alpha, eval_mode, fgsm, make_attack, pgd
from pyeuler.robust.training import (
    ADV_METHODS, GradientMaskingWarning, accuracy, batches, evaluate, pgd_at_loss,
    trades_adversarial, trades_loss, train_epoch, uses_detached_ie_gradients,
    warn_if_gradient_masking,
)
from pyeuler.robust.zoo import MODEL_NAMES, build_model, default_model

__all__ = [
    "fgsm", "pgd", "cw", "make_attack", "default_alpha", "eval_mode", "ATTACKS",
    "pgd_at_loss", "trades_adversarial", "trades_loss", "train_epoch", "accuracy", "evaluate",
    "batches", "ADV_METHODS", "GradientMaskingWarning", "uses_detached_ie_gradients",
    "warn_if_gradient_masking", "build_model", "default_model", "MODEL_NAMES",
]
