//! Why a command failed, and how a gRPC status reads in its message.

use vipgate_controlplane::api::ApiError;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CtlError {
    /// Connecting to vipgated or a call failed.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// Writing the output failed.
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
    /// Encoding the JSON document failed.
    #[error("cannot encode the JSON output: {0}")]
    Json(#[from] serde_json::Error),
    /// A desired-state call failed: the status code's name and the server's
    /// reason.
    #[error("{}: {}", code_name(.0.code()), status_message(.0))]
    Status(tonic::Status),
    /// Connecting over TCP with TLS failed.
    #[error("cannot connect to vipgated at {endpoint}: {reason}")]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// The file for `apply` could not be read or parsed.
    #[error("{0}")]
    File(String),
    /// The command line is wrong in a way clap cannot see (exit 2).
    #[error("{0}")]
    Usage(String),
}

/// The gRPC name of a status code, as in `INVALID_ARGUMENT`.
pub(crate) fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The server's reason, or the code's meaning when it gave none.
pub(crate) fn status_message(status: &tonic::Status) -> String {
    if status.message().is_empty() { status.code().description().to_owned() } else { status.message().to_owned() }
}
