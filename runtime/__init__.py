"""trio-ingress runtime: the transport-independent core that inference workers embed.

Register endpoints on a ``Worker``, serve them over transports with ``Worker.serve``/``Worker.run``
or ``open_worker``; see docs/architecture.md for how the pieces fit.
"""

from ._admission import Admission as Admission
from ._admission import AdmissionStatistics as AdmissionStatistics
from ._admission import Rejected as Rejected
from ._auth import ANONYMOUS as ANONYMOUS
from ._auth import Authenticator as Authenticator
from ._auth import Credentials as Credentials
from ._auth import Principal as Principal
from ._auth import TokenFile as TokenFile
from ._config import EXIT_DRAIN_FORCED as EXIT_DRAIN_FORCED
from ._config import EXIT_ENGINE_FAILED as EXIT_ENGINE_FAILED
from ._config import EXIT_FAILURE as EXIT_FAILURE
from ._config import EXIT_OK as EXIT_OK
from ._config import EXIT_USAGE as EXIT_USAGE
from ._config import EndpointOptions as EndpointOptions
from ._config import WorkerConfig as WorkerConfig
from ._context import KillReason as KillReason
from ._context import RequestContext as RequestContext
from ._context import RuntimeContext as RuntimeContext
from ._context import new_request_id as new_request_id
from ._dispatch import answer_error as answer_error
from ._dispatch import dispatch as dispatch
from ._dispatch import dispatch_payload as dispatch_payload
from ._endpoint import CallerGone as CallerGone
from ._endpoint import Endpoint as Endpoint
from ._endpoint import EndpointBinding as EndpointBinding
from ._endpoint import ResponseSink as ResponseSink
from ._endpoint import TransportBinding as TransportBinding
from ._errors import BadRequest as BadRequest
from ._errors import Cancelled as Cancelled
from ._errors import DeadlineExceeded as DeadlineExceeded
from ._errors import EngineStartFailed as EngineStartFailed
from ._errors import ErrorCode as ErrorCode
from ._errors import ExchangeEnded as ExchangeEnded
from ._errors import IngressError as IngressError
from ._errors import InternalError as InternalError
from ._errors import NotFound as NotFound
from ._errors import Overloaded as Overloaded
from ._errors import PermissionDenied as PermissionDenied
from ._errors import RemoteError as RemoteError
from ._errors import ShuttingDown as ShuttingDown
from ._errors import StartupFailed as StartupFailed
from ._errors import Unauthenticated as Unauthenticated
from ._errors import Unavailable as Unavailable
from ._errors import describe as describe
from ._exchange import Inbox as Inbox
from ._inflight import GlobalInFlight as GlobalInFlight
from ._inflight import InFlight as InFlight
from ._inflight import InFlightStatistics as InFlightStatistics
from ._intake import DRAINING as DRAINING
from ._intake import Admitted as Admitted
from ._intake import Call as Call
from ._intake import Caller as Caller
from ._intake import refuse as refuse
from ._listeners import DEFAULT_BACKLOG as DEFAULT_BACKLOG
from ._listeners import open_listeners as open_listeners
from ._listeners import serve_accepting as serve_accepting
from ._logging import configure_logging as configure_logging
from ._metrics import Metrics as Metrics
from ._readiness import Readiness as Readiness
from ._retry import RetryBudget as RetryBudget
from ._retry import retry_before_first_chunk as retry_before_first_chunk
from ._shutdown import ShutdownCoordinator as ShutdownCoordinator
from ._shutdown import ShutdownResult as ShutdownResult
from ._wire_errors import decode_error as decode_error
from ._wire_errors import encode_error as encode_error
from ._wire_errors import error_body as error_body
from ._wire_errors import remote_error as remote_error
from ._worker import Transport as Transport
from ._worker import Worker as Worker
from ._worker import WorkerHandle as WorkerHandle
from ._worker import open_worker as open_worker

__all__ = [
    "ANONYMOUS",
    "DEFAULT_BACKLOG",
    "DRAINING",
    "EXIT_DRAIN_FORCED",
    "EXIT_ENGINE_FAILED",
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_USAGE",
    "Admission",
    "AdmissionStatistics",
    "Admitted",
    "Authenticator",
    "BadRequest",
    "Call",
    "Caller",
    "CallerGone",
    "Cancelled",
    "Credentials",
    "DeadlineExceeded",
    "Endpoint",
    "EndpointBinding",
    "EndpointOptions",
    "EngineStartFailed",
    "ErrorCode",
    "ExchangeEnded",
    "GlobalInFlight",
    "InFlight",
    "InFlightStatistics",
    "Inbox",
    "IngressError",
    "InternalError",
    "KillReason",
    "Metrics",
    "NotFound",
    "Overloaded",
    "PermissionDenied",
    "Principal",
    "Readiness",
    "Rejected",
    "RemoteError",
    "RequestContext",
    "ResponseSink",
    "RetryBudget",
    "RuntimeContext",
    "ShutdownCoordinator",
    "ShutdownResult",
    "ShuttingDown",
    "StartupFailed",
    "TokenFile",
    "Transport",
    "TransportBinding",
    "Unauthenticated",
    "Unavailable",
    "Worker",
    "WorkerHandle",
    "answer_error",
    "configure_logging",
    "decode_error",
    "describe",
    "dispatch",
    "dispatch_payload",
    "encode_error",
    "error_body",
    "new_request_id",
    "open_listeners",
    "open_worker",
    "refuse",
    "remote_error",
    "retry_before_first_chunk",
    "serve_accepting",
]
