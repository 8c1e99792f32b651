"""Run under torchrun as ``tarflow_commands.py COMMANDS.json``: every rank runs each ``tarflow`` command line of the
JSON list in turn, in one process group (each command uses an existing group), so that a test pays for the
processes' start-up once. Launched by path, not as a module: a ``tests`` package installed by a library
(torch-fidelity ships one) would shadow ``-m tests.<name>``."""

import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from cluster.env import discover  # noqa: E402
from tarflow.main import main  # noqa: E402
from trainer.distributed import process_group  # noqa: E402

if __name__ == "__main__":
    commands = json.loads(Path(sys.argv[1]).read_text())
    with process_group(discover(), torch.device("cpu")):
        for argv in commands:
            assert main(argv) == 0, argv
