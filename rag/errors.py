"""Typed errors of the library. The gateway maps each to one HTTP status, in one place."""

from __future__ import annotations


class RagError(Exception):
    """Base of every error the library raises on purpose."""


class InvalidRequestError(RagError):
    """The caller asked for something malformed (empty question, bad parameter)."""


class KnowledgeBaseNotFoundError(RagError):
    """The named knowledge base, or the asked-for version of it, does not exist."""


class VersionNotFoundError(KnowledgeBaseNotFoundError):
    """A pipeline version that is not deployed (asked for by name, as an evaluation does)."""


class UnsupportedDocumentError(RagError):
    """A file whose type no loader handles, or whose content cannot be read."""


class IndexMismatchError(RagError):
    """An index built with another embedding model or dimension than the one serving."""


class ServiceUnavailableError(RagError):
    """A stage is not loaded yet, or has been closed."""


class GenerationError(RagError):
    """The generator failed while producing an answer."""


class AuthenticationError(RagError):
    """A request without a valid API key."""


class RequestTooLargeError(InvalidRequestError):
    """A request body over the gateway's size limit."""


class BodyTimeoutError(InvalidRequestError):
    """A request body that did not arrive within the gateway's deadline for it (408)."""


class OverloadedError(ServiceUnavailableError):
    """A stage's queue is full: the caller should retry later rather than wait."""


class RateLimitedError(OverloadedError):
    """An upstream server (an OpenAI-compatible LLM) said 429: retry after what it asked for."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[type, tuple[str, float | None]]:  # crosses replicas (pickled) whole
        return (type(self), (str(self), self.retry_after_s))


class UpstreamTimeoutError(ServiceUnavailableError):
    """A stage did not answer within the gateway's deadline for that hop."""


class ForbiddenError(RagError):
    """Not allowed from where it came: another site's page, a name the gateway does not answer to."""


class ConflictError(RagError):
    """The request conflicts with what is stored (a KB that exists, a file that would be overwritten)."""


class DocumentNotFoundError(KnowledgeBaseNotFoundError):
    """The named file is not in the knowledge base."""
