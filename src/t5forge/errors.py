"""The one exception type for bad user input.

Anything the user can fix (a missing file, a wrong config key, a tokenizer that does not fit the
model) is raised as `T5ForgeError` with a message that says what is wrong and what to do. The CLI
prints it as a single line; everything else is a bug and keeps its traceback.
"""


class T5ForgeError(Exception):
    """A problem with the user's input, reported as one actionable line."""


# Exit codes of `t5forge pretrain` / `t5forge finetune` besides 0 (done) and 2 (a T5ForgeError).
EXIT_STOPPED = 75  # stopped by SIGTERM / SIGINT / SIGUSR1 after saving a checkpoint (EX_TEMPFAIL: relaunch)
EXIT_ABORTED = 130  # a second Ctrl-C: stopped at once, nothing saved since the last checkpoint


class RunStopped(Exception):
    """A run that stopped early on purpose (a signal) after saving a checkpoint; the CLI prints the
    message as one line and exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int = EXIT_STOPPED):
        super().__init__(message)
        self.exit_code = exit_code
