//! # cluster
//!
//! Node.js `cluster` semantics and PM2-grade process management for tokio servers.
//!
//! One binary runs as the **master** or as a **worker**. The master re-executes its own binary
//! for each worker, owns the listening sockets, accepts connections and hands them to workers
//! as file descriptors over `SOCK_SEQPACKET` channels; it replaces workers that die and stops
//! them gracefully. The application code is the same in every role:
//!
//! ```no_run
//! use cluster::net::TcpListener;
//!
//! #[cluster::main(workers = 4)]
//! async fn main() -> std::io::Result<()> {
//!     let mut listener = TcpListener::bind("127.0.0.1:8080").await?;
//!     loop {
//!         tokio::select! {
//!             conn = listener.accept() => {
//!                 let (stream, _peer) = conn?;
//!                 tokio::spawn(async move { drop(stream) /* serve it */ });
//!             }
//!             _ = cluster::worker::shutdown() => return Ok(()),
//!         }
//!     }
//! }
//! ```
//!
//! Layout: [`net`] (role-transparent listeners), [`worker`] (the worker's and the agent's API),
//! `http` (graceful HTTP for hyper, axum and tonic; feature `http`),
//! [`master`] (events and control for code in the master), [`messaging`] (messages between
//! processes), [`Cluster`] (the builder behind the macro).
#![warn(missing_docs)]
// `unsafe` lives in `sys` alone (its module allows it); nowhere else does it compile.
#![deny(unsafe_code)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod builder;
mod config;
pub mod control;
pub mod env;
#[cfg(feature = "http")]
pub mod http;
mod ipc;
mod log;
pub mod master;
pub mod messaging;
pub mod metrics;
pub mod net;
mod role;
#[allow(unsafe_code)]
mod sys;
pub mod worker;

pub use builder::{Builder, Cluster, role};
pub use cluster_macros::main;
pub use config::{Balancer, Policy};
pub use env::{ENV_CHANNEL_FD, ENV_UNIQUE_ID, ENV_WORKERS};
pub use ipc::message::MAX_USER_MESSAGE;
pub use ipc::{ProtocolError, RecvError};
pub use master::Master;
pub use messaging::Peer;
pub use net::is_closed;
pub use role::{Role, StartError};
pub use sys::ChannelFdError;

/// Used by `#[cluster::main]`; not a public API.
#[doc(hidden)]
pub mod __private {
    pub use crate::builder::Builder;
    pub use crate::ipc::bench as ipc_bench;
    pub use crate::master::fuzz;

    /// A recorder with a segment of its own, as a worker has one, for the benchmark
    /// (`benches/metrics.rs`) to measure records without a master.
    #[cfg(feature = "metrics")]
    pub fn metrics_bench_recorder() -> crate::metrics::Recorder {
        let words = crate::metrics::segment::WORDS;
        let fd = crate::sys::create_segment("bench", words).expect("a segment");
        let map = crate::sys::map_segment(&fd, words).expect("mapped");
        crate::metrics::segment::init(map.words());
        crate::metrics::attach(fd, words).expect("attached");
        crate::metrics::prepare(&Vec::new(), false);
        crate::metrics::recorder()
    }

    /// A worker's first message as this build encodes it (for tests that speak the protocol
    /// by hand).
    pub fn hello(pid: u32) -> Vec<u8> {
        let mut out = bytes::BytesMut::new();
        crate::ipc::encode::hello(&mut out, crate::ipc::message::PROTOCOL_VERSION, pid);
        out.to_vec()
    }
}
