"""How the harness is stopped: the signals every long-running command treats like Ctrl-C, and
the exit code it then returns. No torch here: the CLI and the matrix parent import it."""
from __future__ import annotations

import signal

# Ctrl-C, and how schedulers stop jobs: SIGTERM (kill, scancel, pre-emption) and SIGUSR1 (Slurm's
# warning before a time limit, with `--signal=USR1@T`)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def stop_exit_code(name: str | None) -> int:
    """The shell's convention for a stop by signal N is exit 128 + N; Ctrl-C (and --max-steps,
    which has no signal) give 130."""
    return 128 + (getattr(signal, name, signal.SIGINT) if name else signal.SIGINT).value
