//! Credentials and socket files: who workers run as (resolved in the master, set in the
//! child), and the mode and owner of a Unix socket's file.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use super::check;

/// This process's effective user id.
pub(crate) fn geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// This process's real user id.
pub(crate) fn getuid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

/// Who workers run as (`CLUSTER_USER` / `CLUSTER_GROUP`), resolved in the master before
/// anything starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Credentials {
    pub(crate) uid: libc::uid_t,
    pub(crate) gid: libc::gid_t,
    /// Supplementary groups: the user's (as `initgroups` would set them), or just `gid`.
    pub(crate) groups: Vec<libc::gid_t>,
}

/// Resolves a user (name or number) and optionally a group (name or number; default: the
/// user's primary group) into credentials, with the user's supplementary groups.
pub(crate) fn lookup_credentials(user: Option<&str>, group: Option<&str>) -> Result<Credentials, String> {
    let (uid, mut gid, name) = match user {
        Some(user) => {
            let (uid, gid, name) = lookup_user(user)?;
            (uid, gid, Some(name))
        }
        // Only a group: keep this user.
        // SAFETY: getgid has no preconditions and cannot fail.
        None => (getuid(), unsafe { libc::getgid() }, None),
    };
    if let Some(group) = group {
        gid = lookup_group(group)?;
    }
    let groups = match &name {
        Some(name) => supplementary_groups(name, gid)?,
        None => vec![gid],
    };
    Ok(Credentials { uid, gid, groups })
}

fn lookup_user(user: &str) -> Result<(libc::uid_t, libc::gid_t, std::ffi::CString), String> {
    let cname = std::ffi::CString::new(user).map_err(|_| format!("user {user:?} contains a NUL byte"))?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: getpwnam_r/getpwuid_r write only into `pwd`, `buf` (of the length given) and
    // `found`; the pointers in `pwd` point into `buf`, which outlives their use here.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        let rc = match user.parse::<libc::uid_t>() {
            Ok(uid) => libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut found),
            Err(_) => libc::getpwnam_r(cname.as_ptr(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut found),
        };
        if rc != 0 {
            return Err(format!("cannot look up user {user:?}: {}", io::Error::from_raw_os_error(rc)));
        }
        if found.is_null() {
            return Err(format!("no such user: {user:?}"));
        }
        let name = std::ffi::CStr::from_ptr(pwd.pw_name).to_owned();
        Ok((pwd.pw_uid, pwd.pw_gid, name))
    }
}

fn lookup_group(group: &str) -> Result<libc::gid_t, String> {
    let cname = std::ffi::CString::new(group).map_err(|_| format!("group {group:?} contains a NUL byte"))?;
    let mut buf = vec![0 as libc::c_char; 64 * 1024];
    // SAFETY: as in `lookup_user`, for the group database.
    unsafe {
        let mut grp: libc::group = std::mem::zeroed();
        let mut found: *mut libc::group = std::ptr::null_mut();
        let rc = match group.parse::<libc::gid_t>() {
            Ok(gid) => libc::getgrgid_r(gid, &mut grp, buf.as_mut_ptr(), buf.len(), &mut found),
            Err(_) => libc::getgrnam_r(cname.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut found),
        };
        if rc != 0 {
            return Err(format!("cannot look up group {group:?}: {}", io::Error::from_raw_os_error(rc)));
        }
        if found.is_null() {
            return Err(format!("no such group: {group:?}"));
        }
        Ok(grp.gr_gid)
    }
}

/// The groups `initgroups(name, gid)` would set, read here so the child only calls `setgroups`.
fn supplementary_groups(name: &std::ffi::CStr, gid: libc::gid_t) -> Result<Vec<libc::gid_t>, String> {
    let mut n: libc::c_int = 64;
    loop {
        let mut groups = vec![0 as libc::gid_t; n as usize];
        let before = n;
        // SAFETY: getgrouplist writes at most `n` entries into `groups` and sets `n`.
        let rc = unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
        if rc >= 0 {
            groups.truncate(n as usize);
            return Ok(groups);
        }
        if n <= before {
            n = before * 2;
        }
        if n > 65_536 {
            return Err(format!("user {name:?} is in too many groups"));
        }
    }
}

/// Whether `creds` may create files in `dir` (write and search permission, by the mode bits).
pub(crate) fn may_write_dir(dir: &std::path::Path, creds: &Credentials) -> io::Result<bool> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(dir)?;
    let mode = meta.permissions().mode();
    let bits = if creds.uid == 0 {
        return Ok(true);
    } else if meta.uid() == creds.uid {
        mode >> 6
    } else if creds.groups.contains(&meta.gid()) || meta.gid() == creds.gid {
        mode >> 3
    } else {
        mode
    };
    Ok(bits & 0o3 == 0o3)
}

/// Sets the mode and owner of the socket file at `path` through a descriptor of the file
/// itself (`O_PATH | O_NOFOLLOW`): if `path` is not a socket any more (a symlink or another
/// file was put there), nothing is changed and it is an error.
pub(crate) fn set_socket_file(
    path: &std::path::Path,
    mode: Option<u32>,
    owner: Option<(libc::uid_t, libc::gid_t)>,
) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let cpath = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))?;
    // SAFETY: `cpath` is a valid C string; the returned descriptor is owned below.
    let fd = check(unsafe { libc::open(cpath.as_ptr(), libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC) })?;
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: an all-zero `stat` is a valid value of the plain C struct.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into `stat` only.
    check(unsafe { libc::fstat(fd.as_raw_fd(), &mut stat) })?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} is not the socket just bound (replaced meanwhile?)", path.display()),
        ));
    }
    if let Some((uid, gid)) = owner {
        // SAFETY: AT_EMPTY_PATH with "" acts on `fd` itself.
        check(unsafe { libc::fchownat(fd.as_raw_fd(), c"".as_ptr(), uid, gid, libc::AT_EMPTY_PATH) })?;
    }
    if let Some(mode) = mode {
        // chmod has no "empty path" form for an O_PATH descriptor; its /proc link names the
        // file it was opened on, not whatever `path` holds now.
        let perms = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(mode);
        std::fs::set_permissions(format!("/proc/self/fd/{}", fd.as_raw_fd()), perms)?;
    }
    Ok(())
}
