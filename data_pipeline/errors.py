"""Kiln's errors for what the user can fix, and the data pipeline's error for the run as a whole.

`KilnError` is the one base of every error that is a user mistake or an unusable environment
(a bad configuration, a missing or foreign file, a scheduler or server that does not answer).
It is raised where the problem is found and caught once: by the `kiln` command's `main` and by
a training rank's entry point, which print `str(error)` as one line and exit with
`error.exit_code`. Any other exception is a bug and propagates with its traceback.
"""

from __future__ import annotations


class KilnError(Exception):
    """A problem the user can fix, told in one line: `str(error)` is the whole message.

    Raised for a user mistake or an unusable environment, never for a bug; caught once, by
    the `kiln` command's `main` (and a training rank's entry point), which prints the line
    and exits with `exit_code` (2, as argparse does for a bad command line). Anything that is
    not a KilnError is a bug there and propagates with its traceback.
    """

    exit_code = 2
    heading = ""  # words put before the message when it is shown, e.g. "invalid configuration"

    def line(self, prefix: str) -> str:
        """What the user is shown: `PREFIX: [HEADING: ]MESSAGE`, e.g. `kiln export: ...`."""
        heading = f"{self.heading}: " if self.heading else ""
        return f"{prefix}: {heading}{self}"


class PrepareError(KilnError):
    """A problem with the output directory, the Ray cluster or the run, as one line."""
