"""What a ``tokmask`` command prints: our progress, results and warnings, and third-party errors.

Every command used to print routine third-party notices as well. These are now kept off the console:
- transformers' LOAD REPORT naming the classification head MISSING. The head is new by design: it is
  trained and saved with the adapter.
- weight-loading, GGUF and shard-writing progress bars.
- bitsandbytes' note that the optional ``kernels`` package for its CPU 4-bit GEMM is absent, and ``kernels``'
  own note that offline it skips the publisher trust check of the kernel it loads. peft
  imports bitsandbytes on ``import peft`` (``peft/helpers.py``), so that import cannot wait for QLoRA.
- FutureWarnings and other warnings raised inside the libraries.

:func:`quiet` keeps them off the console; errors still show, and ``--verbose`` brings them back.
:func:`kept_in` writes them to the run's ``third_party.log`` while it trains. Our own warnings are
:class:`TokmaskWarning` and always reach the console.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from pathlib import Path
from typing import Iterator

THIRD_PARTY = ("transformers", "peft", "accelerate", "bitsandbytes", "kernels", "huggingface_hub", "torch",
               "tokmask.warnings")
THIRD_PARTY_LOG = "third_party.log"
CONSOLE_HANDLER = "tokmask.console"
_WARNINGS = logging.getLogger("tokmask.warnings")  # third-party Python warnings, routed as log records


class TokmaskWarning(UserWarning):
    """A warning of ours: something the user should know (an unfinished run, replaced bytes)."""


def quiet(verbose: bool = False) -> None:
    """Third-party log records and warnings reach the console only at ERROR; with ``verbose``, what the
    libraries print by default (warnings, progress bars) shows too."""
    import huggingface_hub.utils
    from transformers.utils import logging as transformers_logging

    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING if verbose else logging.ERROR)
    console.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
    console.name = CONSOLE_HANDLER
    transformers_logging.disable_default_handler()  # its stderr handler passes warnings; ours decides
    for name in THIRD_PARTY:
        logger = logging.getLogger(name)
        logger.setLevel(logging.WARNING)
        for old in [h for h in logger.handlers if h.name == CONSOLE_HANDLER]:  # called again: replace
            logger.removeHandler(old)
        logger.addHandler(console)
        logger.propagate = False
    if not verbose:
        transformers_logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()
    warnings.showwarning = _show_warning
    warnings.simplefilter("default")  # each warning once per place, as Python's default


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, TokmaskWarning):
        print(f"tokmask: warning: {message}", file=sys.stderr)
    else:
        _WARNINGS.warning("%s:%s: %s: %s", filename, lineno, category.__name__, message)


@contextlib.contextmanager
def kept_in(folder: str | Path) -> Iterator[None]:
    """Third-party warnings (and above) of the block also go to ``folder/third_party.log``."""
    log = Path(folder) / THIRD_PARTY_LOG
    log.parent.mkdir(parents=True, exist_ok=True)
    # Opened on the first notice: a run refused before it starts leaves no file behind (and so no folder).
    handler = logging.FileHandler(log, encoding="utf-8", delay=True)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(levelname)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in THIRD_PARTY]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield
        log.touch()  # a finished block always holds one, so every run has the same set of files
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        handler.close()
