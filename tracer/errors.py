"""Errors that reach the user as one line and a non-zero exit."""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; the CLI prints ``acceptrace: <message>`` and exits."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class KernelRefused(UserError):
    """The kernel refuses a whole program type (a security policy, no BPF
    trampolines): true until reboot, whatever the program holds."""
