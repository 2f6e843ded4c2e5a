"""Run the command line in a fresh process that is stopped at a chosen training step: killed outright
(``os._exit``, no clean-up, as a crash or a power cut) or sent Ctrl-C (SIGINT)."""

import subprocess
import sys
import textwrap


def run_until(argv: list[str], steps: int, how: str = "crash") -> subprocess.CompletedProcess:
    """``fwdtrans argv`` in a new process; when it is about to take step ``steps + 1``, it dies
    (``how="crash"``: exit status 9) or receives SIGINT (``how="interrupt"``) and carries on."""
    stop = "os._exit(9)" if how == "crash" else "os.kill(os.getpid(), signal.SIGINT)"
    script = textwrap.dedent(f"""
        import os, signal, sys, fwdtrans
        from fwdtrans.app import main
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as in a terminal, even from a background job
        original, taken = fwdtrans.Converted.train_step, [0]
        def train_step(self, optimizer, **kwargs):
            step = original(self, optimizer, **kwargs)
            def stopping(x, y):
                if taken[0] == {steps}:
                    {stop}
                taken[0] += 1
                return step(x, y)
            return stopping
        fwdtrans.Converted.train_step = train_step
        sys.exit(main({argv!r}))
    """)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=False)
