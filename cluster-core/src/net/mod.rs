//! Role-transparent sockets.
//!
//! In a worker, binding asks the master, which owns the real listening socket and hands over
//! each accepted connection. Outside a cluster (`CLUSTER_WORKERS=0`, tests, the master's own
//! code) the same call binds directly. Either way user code gets plain tokio types.

mod tcp;

pub(crate) use tcp::is_connection_error;

pub use tcp::{TcpListener, is_closed};
