"""Errors an operator can act on, and the daemon's exit codes."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Documented in docs/operations.md; stable across releases."""

    OK = 0  # clean shutdown (SIGTERM/SIGINT); the lease is kept
    ERROR = 1  # start-up failure: no interface, backend could not start
    CONFIG = 2  # network config invalid, or a bad flag / variable (argparse exits 2, as Go's flag package)
    OUT_OF_SUBNETS = 3  # every subnet between SubnetMin and SubnetMax is leased
    LEASE_REVOKED = 4  # our lease key was deleted by someone else


class FlannelError(Exception):
    """Base of errors that carry an operator-facing message and an exit code."""

    exit_code: ExitCode = ExitCode.ERROR


class ConfigError(FlannelError):
    exit_code = ExitCode.CONFIG


class OutOfSubnetsError(FlannelError):
    exit_code = ExitCode.OUT_OF_SUBNETS


class LeaseRevokedError(FlannelError):
    exit_code = ExitCode.LEASE_REVOKED


class InterfaceError(FlannelError):
    exit_code = ExitCode.ERROR
