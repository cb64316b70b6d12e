//! Role-transparent sockets.
//!
//! In a worker, binding asks the master, which owns the real listening socket and hands over
//! each accepted connection. Outside a cluster (`CLUSTER_WORKERS=0`, tests, the master's own
//! code) the same call binds directly. Either way user code gets plain tokio types.

pub(crate) mod proxy;
mod tcp;
mod udp;
mod unix;

pub use proxy::is_closed;
pub use tcp::TcpListener;
pub use udp::UdpSocket;
pub use unix::UnixListener;
pub(crate) use unix::bind_unix;
