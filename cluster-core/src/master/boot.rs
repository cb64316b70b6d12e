//! Starting the master: logging, limits, the credentials workers run as, a handover from an
//! old master (`upgrade`), the operators' ways in, then the supervisor until the cluster stops.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::handle::{AppMetrics, Handle, Master, MasterHook, Registry};
use super::{admin, control, events, observe, pid_file, supervisor, upgrade, watch};
use crate::config::Config;
use crate::log::log;
use crate::messaging::Calls;

/// Runs the master until the cluster stops; returns the exit code.
pub(crate) fn run(cfg: Config, hook: Option<MasterHook>) -> i32 {
    let _log = crate::log::init(cfg.log_format, cfg.log_filter.as_deref());
    // The ring of recent records exists from the first one on (`clusterctl logs`).
    crate::log::ring::ring();
    // One thread: the master's work is accept + sendmsg, and PR_SET_PDEATHSIG is tied to the
    // thread that forks, which must live as long as the master.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            log!("cannot build the master's runtime: {e}");
            return 1;
        }
    };
    // Connections are descriptors: the master and its workers may use all the hard limit allows.
    match crate::sys::raise_fd_limit() {
        Ok((before, after)) if after > before => {
            crate::log::note!(event = "fd_limit", before, after, "open files limit raised from {before} to {after}");
        }
        Ok(_) => {}
        Err(e) => crate::log::warning!(event = "fd_limit", error = %e, "cannot raise the open files limit: {e}"),
    }
    let mut cfg = cfg;
    if cfg.user.is_some() || cfg.group.is_some() {
        match credentials(&cfg) {
            Ok(creds) => cfg.credentials = Some(Arc::new(creds)),
            Err(e) => {
                crate::log::say!("{e}");
                return 2;
            }
        }
    }
    // A master started by an upgrade takes what its predecessor hands over first.
    let taken = match runtime.block_on(upgrade::Successor::connect()) {
        None => None,
        Some(Ok(taken)) => Some(taken),
        Some(Err(e)) => {
            log!("cannot take over from the old master: {e}");
            return 1;
        }
    };
    let (successor, mut handover) = match taken {
        Some((successor, handover)) => (Some(successor), handover),
        None => (None, upgrade::Handover::default()),
    };
    if successor.is_some() && handover.workers > 0 {
        cfg.workers = handover.workers;
    }
    let cfg = Arc::new(cfg);
    let name = cfg.name.clone().unwrap_or_else(crate::control::default_name);
    // A successor writes it when it takes over.
    if successor.is_none()
        && let Some(pid_file) = &cfg.pid_file
        && let Err(e) = pid_file::write(pid_file)
    {
        log!("cannot write the pid file {}: {e}", pid_file.display());
        return 1;
    }
    let pid_file = cfg.pid_file.clone();
    let code = runtime.block_on(async move {
        let registry = Registry::default();
        let calls = Arc::new(Calls::default());
        let (asks_tx, asks) = mpsc::unbounded_channel();
        let (events, receiver) = events::Events::new(hook.is_some());
        let app_metrics = AppMetrics::default();
        let handle = Handle {
            registry: registry.clone(),
            calls: calls.clone(),
            asks: asks_tx,
            readings: Arc::new(observe::Readings::default()),
            app_metrics: app_metrics.clone(),
            history: Arc::default(),
        };
        tokio::spawn(watch::sample(handle.clone()));
        // Operators' ways in: the control socket and the admin endpoint, both thin layers over
        // the handle. A successor serves them (on the sockets handed over) once it takes over;
        // a master that handed over stops serving them.
        let (serving_tx, serving) = tokio::sync::watch::channel(successor.is_none());
        let control = control::serve(&cfg, &name, handle.clone(), handover.control.take(), serving.clone());
        let admin = match cfg.admin_addr {
            Some(addr) => match admin::serve(addr, handover.admin.take(), handle.clone(), serving).await {
                Ok(admin) => Some(admin),
                Err(e) => {
                    log!("cannot serve the admin endpoint on {addr}: {e}");
                    return 1;
                }
            },
            None => None,
        };
        if let (Some(hook), Some(events)) = (hook, receiver) {
            tokio::spawn(hook(Master { handle, events }));
        } else {
            drop(handle);
        }
        let info = supervisor::Info {
            name,
            control_socket: control.as_ref().map(|c| c.path().to_path_buf()),
            control_fd: control.as_ref().and_then(|c| Some((c.path().to_path_buf(), c.dup().ok()?))),
            admin_fd: admin.as_ref().and_then(|a| a.dup().ok()),
        };
        let successor = successor.map(|s| (s, handover.listeners));
        let supervisor = supervisor::Supervisor::new(
            cfg.clone(),
            info,
            registry,
            calls,
            events,
            asks,
            serving_tx,
            successor,
            app_metrics,
        );
        let code = match supervisor {
            Ok(supervisor) => supervisor.run().await,
            Err(e) => {
                log!("cannot start: {e}");
                1
            }
        };
        // Let control clients (`logs -f`, `stop`) take the last records before their
        // connections close with the runtime: their tasks were woken by them, and each runs
        // when this one yields.
        for _ in 0..16 {
            tokio::task::yield_now().await;
        }
        drop((control, admin));
        code
    });
    drop(runtime);
    if let Some(pid_file) = &pid_file {
        pid_file::remove(pid_file);
    }
    code
}

/// Who workers run as, checked before anything starts.
fn credentials(cfg: &Config) -> Result<crate::sys::Credentials, String> {
    let creds = crate::sys::lookup_credentials(cfg.user.as_deref(), cfg.group.as_deref())
        .map_err(|e| format!("{}/{}: {e}", crate::env::ENV_USER, crate::env::ENV_GROUP))?;
    let me = crate::sys::geteuid();
    if me != 0 && creds.uid != me {
        return Err(format!(
            "{}: workers can run as uid {} only if the master runs as root (it runs as uid {me})",
            crate::env::ENV_USER,
            creds.uid
        ));
    }
    Ok(creds)
}
