"""``torch.optim.Optimizer`` adapters: the generic ``ChainOptimizer`` and the named classes."""

from gradchain.optimizers.adapter import ChainOptimizer
from gradchain.optimizers.esgd import ESGD
from gradchain.optimizers.heavyball import (
    ADOPT,
    SFAdamW,
    SFPaLMForeachSOAP,
    SFPaLMSOAP,
    SOAP,
    AdamWInplace,
    ForeachADOPT,
    ForeachAdamW,
    ForeachLaProp,
    ForeachSFAdamW,
    ForeachSOAP,
    LaProp,
    PaLMForeachSFAdamW,
    PaLMForeachSOAP,
    PaLMSFAdamW,
    PaLMSOAP,
    PrecondScheduleForeachSOAP,
    PrecondSchedulePaLMForeachSOAP,
    PrecondSchedulePaLMSOAP,
    PrecondScheduleSFPaLMForeachSOAP,
    PrecondScheduleSFPaLMSOAP,
    PrecondScheduleSOAP,
)
from gradchain.optimizers.hypergrad import HDSGD, MARTHE, RTHO, HDAdam
from gradchain.optimizers.mechanic import Mechanized, mechanize
from gradchain.optimizers.sm3 import SM3
from gradchain.optimizers.standard import SGD, Adam, AdamW

#: Named optimizers by lower-case name, as the command line knows them.
OPTIMIZERS = {
    "sgd": SGD, "adam": Adam, "adamw": AdamW, "sm3": SM3, "esgd": ESGD,
    "adamw-inplace": AdamWInplace, "laprop": LaProp, "adopt": ADOPT, "sfadamw": SFAdamW,
    "palm-sfadamw": PaLMSFAdamW, "soap": SOAP, "palm-soap": PaLMSOAP,
    "sf-palm-soap": SFPaLMSOAP, "precond-schedule-sf-palm-soap": PrecondScheduleSFPaLMSOAP,
    "precond-schedule-palm-soap": PrecondSchedulePaLMSOAP,
    "precond-schedule-soap": PrecondScheduleSOAP,
    "hd-sgd": HDSGD, "hd-adam": HDAdam, "rtho": RTHO, "marthe": MARTHE,
}

#: HeavyBall's names of the optimizers above.
SEED_NAMES = {
    "ForeachAdamW": "adamw-inplace", "ForeachLaProp": "laprop", "ForeachADOPT": "adopt",
    "ForeachSFAdamW": "sfadamw", "PaLMForeachSFAdamW": "palm-sfadamw", "ForeachSOAP": "soap",
    "PaLMForeachSOAP": "palm-soap", "SFPaLMForeachSOAP": "sf-palm-soap",
    "PrecondScheduleSFPaLMForeachSOAP": "precond-schedule-sf-palm-soap",
    "PrecondSchedulePaLMForeachSOAP": "precond-schedule-palm-soap",
    "PrecondScheduleForeachSOAP": "precond-schedule-soap",
}


def _folded(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


_ALIASES = {
    **{_folded(seed): key for seed, key in SEED_NAMES.items()},
    **{_folded(cls.__name__): key for key, cls in OPTIMIZERS.items()},
    **{_folded(key): key for key in OPTIMIZERS},
}


def optimizer_name(name: str) -> str | None:
    """The ``OPTIMIZERS`` key of a name as users write it: the key itself, the class name, or
    HeavyBall's name, in any case, with or without dashes (``ForeachSOAP`` -> ``"soap"``).

    >>> optimizer_name("PrecondSchedulePaLMForeachSOAP")
    'precond-schedule-palm-soap'
    """
    return _ALIASES.get(_folded(name))


__all__ = [
    "ChainOptimizer", "SGD", "Adam", "AdamW", "SM3", "ESGD", "OPTIMIZERS", "SEED_NAMES",
    "optimizer_name", "mechanize", "Mechanized", "HDSGD", "HDAdam", "RTHO", "MARTHE",
    "AdamWInplace", "LaProp", "ADOPT", "SFAdamW", "PaLMSFAdamW", "SOAP", "PaLMSOAP",
    "SFPaLMSOAP", "PrecondScheduleSFPaLMSOAP", "PrecondSchedulePaLMSOAP", "PrecondScheduleSOAP",
    "ForeachAdamW", "ForeachLaProp", "ForeachADOPT", "ForeachSFAdamW", "PaLMForeachSFAdamW",
    "ForeachSOAP", "PaLMForeachSOAP", "SFPaLMForeachSOAP", "PrecondScheduleSFPaLMForeachSOAP",
    "PrecondSchedulePaLMForeachSOAP", "PrecondScheduleForeachSOAP",
]
