"""The one error hierarchy of kleinfarm.

Every error a user can meet derives from :class:`KleinfarmError`; its message names the field and
the limit, so the same text can end a job as ``failed`` or be printed by the CLI.

A failure while running a job is one of three (``docs/architecture.md``, "Failures: whose fault"):
- the job's: a ``KleinfarmError`` that is not transient (bad input): the job fails at once, is
  never retried, and the worker is not blamed;
- transient: a ``TransientError`` (storage, network or Redis unreachable or throttled): the job is
  retried with backoff, and nobody is blamed;
- the worker's: anything else (an unexpected exception): counted against the worker.
"""

from __future__ import annotations


class KleinfarmError(Exception):
    """Base class of every kleinfarm error."""


class ConfigError(KleinfarmError):
    """A setting is missing or invalid."""


class JobSpecError(KleinfarmError):
    """A job or campaign breaks the schema (empty prompt, bad size, unknown field, ...)."""


class CampaignFileError(JobSpecError):
    """A campaign file is not valid YAML or JSONL, or its content breaks the schema."""


class ReferenceImageError(KleinfarmError):
    """A reference image cannot be used; the base of the reference errors below."""


class UnsupportedSchemeError(ReferenceImageError):
    """A reference names a URL scheme other than s3, https or a local path."""


class ReferenceNotFoundError(ReferenceImageError):
    """A reference does not exist at its location."""


class ReferenceInvalidError(ReferenceImageError):
    """A reference is not a decodable image (wrong format or truncated)."""


class ReferenceTooLargeError(ReferenceImageError):
    """A reference exceeds the byte or pixel limit."""


class ReferenceRefusedError(ReferenceImageError):
    """A reference names something the farm will not read (a local path, a forbidden bucket or host)."""


class TransientError(KleinfarmError):
    """A fault that may pass by itself (a service unreachable, throttling): retry later, blame nobody."""


class StorageError(KleinfarmError):
    """The object store refused or failed an operation."""


class StorageUnavailableError(StorageError, TransientError):
    """The object store could not be reached, or answered with a server error or throttling."""


class OutputConflictError(StorageError):
    """An object is already at a job's output key and this job did not write it."""


class CampaignNotFoundError(KleinfarmError):
    """No campaign with this id is known to the farm."""


class JobNotFoundError(KleinfarmError):
    """No job with this id is known to the farm."""


class JobCancelledError(KleinfarmError):
    """The job's campaign was cancelled while it waited or rendered."""


class JobFailedError(KleinfarmError):
    """A job ended failed; raised by its Celery task so monitors see the failure."""


class FarmTimeoutError(KleinfarmError):
    """Waiting for a campaign took longer than the caller allowed."""


class JobTooLargeError(KleinfarmError):
    """A job needs more memory than this worker's card has, even with every cache entry moved off it."""
