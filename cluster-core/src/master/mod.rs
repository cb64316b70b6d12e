//! The master process: supervision (control path) and dispatch (data path), plus the handle
//! that user code running in the master gets.
//!
//! `boot.rs` starts it; `supervisor/` runs its loop and carries out what the decision core
//! (`decide.rs`) decides; `dispatch/` is the data path and `listeners/` the sockets; `upgrade/` the master upgrade;
//! `handle.rs` and `types.rs` are what code in the master, the control socket (`control.rs`)
//! and the admin endpoint (`admin.rs`) see.

mod admin;
mod boot;
mod control;
mod decide;
mod dispatch;
mod events;
#[doc(hidden)]
pub mod fuzz;
mod handle;
mod history;
mod listeners;
mod observe;
mod pid_file;
mod process;
mod supervisor;
mod systemd;
mod types;
mod upgrade;
mod watch;

pub use crate::messaging::{Peer, Request, RequestError, SendError};
pub(crate) use boot::run;
pub(crate) use handle::MasterHook;
pub use handle::{Handle, Master};
pub use types::{
    AGENT_ID, ControlError, Event, ExitInfo, ExitReason, MasterStatus, Overview, Reloaded, Scale, Upgraded,
    WorkerState, WorkerStatus,
};
