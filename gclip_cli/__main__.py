"""The gclip command (``gclip``, ``python -m gclip_cli``).

Signals are held back from its first instant, until its handler is in place, before anything
slow is imported (Click, then NumPy): Ctrl-C or SIGTERM at any moment of the run ends in one
line and exit status 130 or 143.
"""

from __future__ import annotations


def main() -> None:
    import _signal  # built in and already loaded: nothing to wait for

    held = _signal.pthread_sigmask(_signal.SIG_BLOCK, {_signal.SIGINT, _signal.SIGTERM})
    from . import interrupts

    interrupts.install()
    with interrupts.reported():
        _signal.pthread_sigmask(_signal.SIG_SETMASK, held)  # a signal that came acts now
        from .cli import entry_point

        entry_point()


if __name__ == "__main__":
    main()
