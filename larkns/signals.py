"""Which signals larkns passes on to a job (csrc/entry.c's wrapper passes on
the same: forwarded())."""

from __future__ import annotations

import signal

#: Signals that come from outside a process (kill, a terminal, timers): all
#: but SIGKILL/SIGSTOP and the faults a process raises itself (SIGSEGV, ...).
EXTERNAL: frozenset[int] = frozenset(signal.valid_signals()) - {
    signal.SIGKILL,
    signal.SIGSTOP,
    signal.SIGSEGV,
    signal.SIGBUS,
    signal.SIGFPE,
    signal.SIGILL,
    signal.SIGTRAP,
    signal.SIGSYS,
}

#: Passed on to the job: all external signals but job control (a terminal
#: stops the stand-in and the job together) and SIGCHLD (the stand-in's own).
FORWARDED: frozenset[int] = EXTERNAL - {
    signal.SIGCHLD,
    signal.SIGTSTP,
    signal.SIGTTIN,
    signal.SIGTTOU,
}
