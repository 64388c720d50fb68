"""What can go wrong when talking to an HLIP server, in words a user can act on.

``str(error)`` is the sentence to show; ``error.detail`` is the technical detail for the log
(the server's own ``detail``, the socket error...). ``error.status`` is the HTTP status when
there was an answer.
"""
from __future__ import annotations


class HLIPError(Exception):
    """Base class of every error the client raises."""

    def __init__(self, message: str, detail: str = "", status: int | None = None):
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.status = status


class ServerUnreachable(HLIPError):
    """Nothing answers at the address (server down, wrong host or port, connection lost)."""


class NotHLIPServer(HLIPError):
    """Something answers, but it is not a MONAI Label server with the HLIP findings model."""


class AuthenticationRequired(HLIPError):
    """The server wants a user name and password (MONAI Label's authentication is on)."""


class AuthenticationFailed(HLIPError):
    """The user name and password were refused."""


class PermissionDenied(HLIPError):
    """The user is known but lacks the role this request needs (HTTP 403)."""


class NotFound(HLIPError):
    """The study, image or session does not exist on the server (HTTP 404)."""


class RequestRejected(HLIPError):
    """The server refused the request as given (HTTP 4xx); the message carries its reason."""


class ServerBusy(HLIPError):
    """The server's queue is full (HTTP 503); ``retry_after`` is the wait it suggests, in seconds."""

    def __init__(self, message: str, detail: str = "", status: int | None = 503, retry_after: float = 5.0):
        super().__init__(message, detail, status)
        self.retry_after = retry_after


class ServerError(HLIPError):
    """The server failed while answering (HTTP 5xx other than 503)."""


class RequestTimeout(HLIPError):
    """No answer within the time allowed."""


class Cancelled(HLIPError):
    """The user cancelled the request."""

    def __init__(self, message: str = "Cancelled.", detail: str = "", status: int | None = None):
        super().__init__(message, detail, status)


class BadAnswer(HLIPError):
    """The server answered something this client cannot read (a version mismatch or a proxy in between)."""
