"""Adversarial robustness toolkit: attacks, adversarial training, evaluation.

>>> from pyeuler.robust import fgsm, pgd, cw, autoattack, robust_evaluation, train_epoch
>>> x_adv = pgd(model, x, y, eps=8/255, alpha=2/255, steps=10, restarts=5)
>>> x_aa = autoattack(model, x, y, eps=8/255)            # needs pip install "pyeuler[eval]"
>>> state = robust_evaluation(model, x, y, ["fgsm", "pgd-20", "autoattack"], eps=[8/255])
>>> state["results"]["worst_case"]["Linf"]               # per-sample worst case over attacks
>>> check_gradient_masking(model, x, y, eps=[8/255]).verdict()
"""

from pyeuler.robust.attacks import (
    ATTACKS, NORMS, cw, default_alpha, eval_mode, fgsm, make_attack, pgd,
)
from pyeuler.robust.autoattack import autoattack, autoattack_plan, square
from pyeuler.robust.evaluation import (
    AttackSpec, EvalSettings, parse_attack, per_sample, robust_evaluation, summarize, worst_case,
)
from pyeuler.robust.masking import MaskingReport, check_gradient_masking, ie_gradients
from pyeuler.robust.training import (
    ADV_METHODS, OPTIMIZERS, GradientMaskingWarning, accuracy, batches, evaluate,
    load_optimizer_state, make_optimizer, pgd_at_loss,
    trades_adversarial, trades_loss, train_epoch, uses_detached_ie_gradients,
    warn_if_gradient_masking,
)
from pyeuler.robust.zoo import MODEL_NAMES, build_model, default_model

__all__ = [
    "fgsm", "pgd", "cw", "make_attack", "default_alpha", "eval_mode", "ATTACKS", "NORMS",
    "autoattack", "autoattack_plan", "square",
    "AttackSpec", "EvalSettings", "parse_attack", "robust_evaluation", "summarize",
    "worst_case", "per_sample",
    "MaskingReport", "check_gradient_masking", "ie_gradients",
    "pgd_at_loss", "trades_adversarial", "trades_loss", "train_epoch", "accuracy", "evaluate",
    "batches", "ADV_METHODS", "OPTIMIZERS", "make_optimizer", "load_optimizer_state",
    "GradientMaskingWarning",
    "uses_detached_ie_gradients",
    "warn_if_gradient_masking", "build_model", "default_model", "MODEL_NAMES",
]
