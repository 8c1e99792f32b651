"""A last check before a rendered job leaves this machine: no secret value from the environment is in it.

Rendered scripts and manifests are written next to the run's outputs, printed on --dry-run and kept by the
scheduler; credentials reach a job another way (SLURM: the submitter's environment; Kubernetes: a Secret by
name). Nothing here copies environment values in, but an override or an extra line could: this catches that.
"""

from __future__ import annotations

import re
from typing import Mapping

# names that hold credentials by convention (AWS_SECRET_ACCESS_KEY, WANDB_API_KEY, HF_TOKEN, DB_PASSWORD, ...)
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|API_KEY|ACCESS_KEY|PRIVATE_KEY|SESSION_KEY")
MIN_SECRET_LENGTH = 8  # shorter values ("1", "true") would match by accident


def secret_values(environ: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in environ.items() if SECRET_NAME.search(k.upper()) and len(v) >= MIN_SECRET_LENGTH}


def assert_no_secret_values(text: str, environ: Mapping[str, str], what: str) -> None:
    """Raise ValueError naming the variable (never its value) whose value appears in ``text``."""
    leaked = sorted(name for name, value in secret_values(environ).items() if value in text)
    if leaked:
        raise ValueError(f"the rendered {what} would contain the value of {', '.join(leaked)}; pass credentials "
                         f"through the environment (SLURM) or a Secret (Kubernetes), not in overrides or extra lines")
