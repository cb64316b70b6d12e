//! Where a master's control socket lives, and the constants of its protocol: shared by the
//! master (`master/control.rs` serves it) and `clusterctl` (crate `cluster-cli`).
//!
//! The socket is `CLUSTER_CONTROL_SOCKET` if set (`off`: none), otherwise
//! `<dir>/<name>-<master pid>.sock`, where `<dir>` is [`socket_dir`]. The protocol is
//! newline-delimited JSON: the master greets with `{"cluster":"control","version":1,...}`,
//! then answers each request line (`{"cmd":"status"}`) with progress lines (`{"progress":…}`)
//! and one final line (`{"ok":true,…}` or `{"ok":false,"error":"…"}`). README, "Operating a
//! cluster", lists the commands.

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Version of the control protocol, in the greeting. A client refuses another.
pub const PROTOCOL_VERSION: u32 = 1;

/// Longest request line the master reads; a longer one gets an error and its connection is
/// closed.
pub const MAX_LINE: usize = 64 * 1024;

/// The directory of control sockets: `$RUNTIME_DIRECTORY` (systemd's), else
/// `$XDG_RUNTIME_DIR/cluster`, else `/tmp/cluster-<uid>`.
pub fn socket_dir() -> PathBuf {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = var("RUNTIME_DIRECTORY") {
        // systemd may list several, separated by colons: the first is ours.
        let first = dir.to_string_lossy().split(':').next().unwrap_or_default().to_string();
        return PathBuf::from(first);
    }
    if let Some(dir) = var("XDG_RUNTIME_DIR") {
        return dir.join("cluster");
    }
    PathBuf::from(format!("/tmp/cluster-{}", crate::sys::getuid()))
}

/// Makes `cmd` start in a session of its own, detached from the terminal (`setsid` in the
/// child): how `clusterctl start` runs a master in the background.
pub fn detach(cmd: &mut std::process::Command) {
    crate::sys::new_session(cmd);
}

/// The file name of a master's socket in [`socket_dir`].
pub fn socket_file_name(name: &str, pid: u32) -> String {
    format!("{name}-{pid}.sock")
}

/// The name and pid in a socket file name made by [`socket_file_name`].
pub fn parse_socket_file_name(file: &str) -> Option<(&str, u32)> {
    let stem = file.strip_suffix(".sock")?;
    let (name, pid) = stem.rsplit_once('-')?;
    let pid = pid.parse().ok().filter(|p| *p > 0)?;
    valid_name(name).then_some((name, pid))
}

/// Whether `name` can name a cluster: 1 to 64 of letters, digits, `.`, `_`, `-`, not
/// starting with `.` or `-` (it becomes part of a file name).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The default cluster name: the running binary's file name, cut to a [`valid_name`].
pub fn default_name() -> String {
    let exe = std::env::current_exe().ok();
    let file = exe.as_deref().and_then(Path::file_name).map(|f| f.to_string_lossy().into_owned());
    let cleaned: String = file
        .unwrap_or_default()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' })
        .take(64)
        .collect();
    let cleaned = cleaned.trim_start_matches(['.', '-']).to_string();
    if valid_name(&cleaned) { cleaned } else { "cluster".to_string() }
}

/// Checks that `dir` is safe to hold control sockets: a real directory (not a symlink), owned
/// by this user, writable by no one else. Creates it (mode 0700) if it does not exist.
pub fn prepare_dir(dir: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new().mode(0o700).create(dir)?;
            check_dir(dir)
        }
        Err(e) => Err(e),
        Ok(_) => check_dir(dir),
    }
}

/// See [`prepare_dir`]: checks without creating.
pub fn check_dir(dir: &Path) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(dir)?;
    let refuse = |why: String| Err(io::Error::new(io::ErrorKind::PermissionDenied, why));
    if meta.file_type().is_symlink() {
        return refuse(format!("{} is a symbolic link", dir.display()));
    }
    if !meta.is_dir() {
        return refuse(format!("{} is not a directory", dir.display()));
    }
    let uid = crate::sys::getuid();
    if meta.uid() != uid {
        return refuse(format!("{} belongs to uid {}, not to this user (uid {uid})", dir.display(), meta.uid()));
    }
    if meta.permissions().mode() & 0o022 != 0 {
        return refuse(format!(
            "{} is writable by others (mode {:o}); it must not be",
            dir.display(),
            meta.permissions().mode() & 0o777
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_file_names_round_trip_and_odd_ones_are_not_sockets_of_ours() {
        assert_eq!(parse_socket_file_name(&socket_file_name("hello", 42)), Some(("hello", 42)));
        assert_eq!(parse_socket_file_name("my-app-7.sock"), Some(("my-app", 7)));
        for odd in ["hello.sock", "hello-0.sock", "hello-x.sock", "-1.sock", ".a-1.sock", "a b-1.sock", "hello-1"] {
            assert_eq!(parse_socket_file_name(odd), None, "{odd}");
        }
    }

    #[test]
    fn names_are_file_name_safe() {
        assert!(valid_name("hello") && valid_name("a.b_c-1"));
        for bad in ["", ".hidden", "-x", "a/b", "a b", "é", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_directory_others_can_write_or_a_symlink_is_refused() {
        let base = std::env::temp_dir().join(format!("cluster-control-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir(&base).unwrap();
        let dir = base.join("sockets");
        prepare_dir(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(prepare_dir(&dir).is_err());
        let link = base.join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(prepare_dir(&dir).is_ok());
        assert!(prepare_dir(&link).is_err(), "a symlink is not followed");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
