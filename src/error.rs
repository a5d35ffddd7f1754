//! The error type of every fallible operation, and the status code it maps to
//! at the C boundary.

/// Outcome codes shared with the C API (`rpcagent_status_t`), one for one.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    Ok = 0,
    Pending = 1,
    InvalidArgument = -1,
    NotFound = -2,
    Handler = -3,
    Timeout = -4,
    PeerLost = -5,
    Shutdown = -6,
    TooLarge = -7,
    Protocol = -8,
    Auth = -9,
    Init = -10,
    Io = -11,
    Exists = -12,
    /// The destination's send window is full and this call may not wait.
    Busy = -13,
    /// The caller cancelled the call.
    Cancelled = -14,
    Internal = -99,
}

impl Status {
    /// Every status, for tables and tests.
    pub const ALL: [Status; 17] = [
        Status::Ok,
        Status::Pending,
        Status::InvalidArgument,
        Status::NotFound,
        Status::Handler,
        Status::Timeout,
        Status::PeerLost,
        Status::Shutdown,
        Status::TooLarge,
        Status::Protocol,
        Status::Auth,
        Status::Init,
        Status::Io,
        Status::Exists,
        Status::Busy,
        Status::Cancelled,
        Status::Internal,
    ];

    /// The C name of the code, e.g. `"RPCAGENT_ERR_TIMEOUT"`.
    pub fn name(self) -> &'static str {
        match self {
            Status::Ok => "RPCAGENT_OK",
            Status::Pending => "RPCAGENT_PENDING",
            Status::InvalidArgument => "RPCAGENT_ERR_INVALID_ARGUMENT",
            Status::NotFound => "RPCAGENT_ERR_NOT_FOUND",
            Status::Handler => "RPCAGENT_ERR_HANDLER",
            Status::Timeout => "RPCAGENT_ERR_TIMEOUT",
            Status::PeerLost => "RPCAGENT_ERR_PEER_LOST",
            Status::Shutdown => "RPCAGENT_ERR_SHUTDOWN",
            Status::TooLarge => "RPCAGENT_ERR_TOO_LARGE",
            Status::Protocol => "RPCAGENT_ERR_PROTOCOL",
            Status::Auth => "RPCAGENT_ERR_AUTH",
            Status::Init => "RPCAGENT_ERR_INIT",
            Status::Io => "RPCAGENT_ERR_IO",
            Status::Exists => "RPCAGENT_ERR_EXISTS",
            Status::Busy => "RPCAGENT_ERR_BUSY",
            Status::Cancelled => "RPCAGENT_ERR_CANCELLED",
            Status::Internal => "RPCAGENT_ERR_INTERNAL",
        }
    }

    /// The status with this numeric code, if there is one.
    pub fn from_code(code: i32) -> Option<Status> {
        Status::ALL.iter().copied().find(|s| *s as i32 == code)
    }
}

/// Why an operation failed. Each variant maps to one [`Status`].
///
/// Remote failures keep the rank that failed, the function that was called and
/// the message the remote side gave.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RpcError {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("rank {rank} has no function named '{function}'")]
    NotFound { rank: usize, function: String },
    #[error("handler '{function}' on rank {rank} failed: {message}")]
    Handler {
        rank: usize,
        function: String,
        message: String,
    },
    #[error("{0}")]
    Timeout(String),
    #[error("lost rank {rank}: {reason}")]
    PeerLost { rank: usize, reason: String },
    #[error("shut down: {0}")]
    Shutdown(String),
    #[error("too large: {0}")]
    TooLarge(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("joining the world failed: {0}")]
    Init(String),
    #[error("I/O error: {0}")]
    Io(String),
    #[error("'{0}' is already registered")]
    Exists(String),
    #[error("busy: {0}")]
    Busy(String),
    #[error("cancelled: {0}")]
    Cancelled(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl RpcError {
    /// The C status code of this error.
    pub fn status(&self) -> Status {
        match self {
            RpcError::InvalidArgument(_) => Status::InvalidArgument,
            RpcError::NotFound { .. } => Status::NotFound,
            RpcError::Handler { .. } => Status::Handler,
            RpcError::Timeout(_) => Status::Timeout,
            RpcError::PeerLost { .. } => Status::PeerLost,
            RpcError::Shutdown(_) => Status::Shutdown,
            RpcError::TooLarge(_) => Status::TooLarge,
            RpcError::Protocol(_) => Status::Protocol,
            RpcError::Auth(_) => Status::Auth,
            RpcError::Init(_) => Status::Init,
            RpcError::Io(_) => Status::Io,
            RpcError::Exists(_) => Status::Exists,
            RpcError::Busy(_) => Status::Busy,
            RpcError::Cancelled(_) => Status::Cancelled,
            RpcError::Internal(_) => Status::Internal,
        }
    }

    /// Rebuilds the error a remote rank reported for a call, from the status
    /// and message that travelled in its response.
    pub(crate) fn from_remote(status: Status, rank: usize, function: String, message: String) -> RpcError {
        match status {
            Status::NotFound => RpcError::NotFound { rank, function },
            Status::Handler => RpcError::Handler {
                rank,
                function,
                message,
            },
            Status::Timeout => RpcError::Timeout(format!("call to '{function}' on rank {rank}: {message}")),
            Status::PeerLost => RpcError::PeerLost { rank, reason: message },
            Status::Shutdown => RpcError::Shutdown(format!("rank {rank} is shutting down ({message})")),
            Status::TooLarge => RpcError::TooLarge(format!("reply of '{function}' on rank {rank}: {message}")),
            Status::InvalidArgument => RpcError::InvalidArgument(format!("rank {rank}, '{function}': {message}")),
            Status::Protocol => RpcError::Protocol(format!("rank {rank}: {message}")),
            Status::Auth => RpcError::Auth(format!("rank {rank}: {message}")),
            Status::Init => RpcError::Init(format!("rank {rank}: {message}")),
            Status::Io => RpcError::Io(format!("rank {rank}: {message}")),
            Status::Exists => RpcError::Exists(message),
            Status::Busy => RpcError::Busy(format!("rank {rank}: {message}")),
            Status::Cancelled => RpcError::Cancelled(format!("rank {rank}, '{function}': {message}")),
            Status::Ok | Status::Pending | Status::Internal => {
                RpcError::Internal(format!("rank {rank}, '{function}': {message}"))
            }
        }
    }
}

impl From<std::io::Error> for RpcError {
    fn from(e: std::io::Error) -> Self {
        RpcError::Io(e.to_string())
    }
}

pub type Result<T, E = RpcError> = std::result::Result<T, E>;
