//! `/proc` parsing: CPU time, resident memory and socket inodes of a process. The parsers
//! are plain functions on text, unit-tested on fixed lines below.

use std::io;
use std::time::Duration;

/// CPU time (user + system) process `pid` has used, from `/proc/<pid>/stat`.
pub(crate) fn cpu_time(pid: u32) -> io::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let ticks = stat_cpu_ticks(&stat).ok_or_else(|| unexpected("/proc/<pid>/stat"))?;
    Ok(Duration::from_nanos(ticks * 1_000_000_000 / clock_ticks()))
}

/// Inodes of the sockets process `pid` has open (from `/proc/<pid>/fd`).
pub(crate) fn socket_inodes(pid: u32) -> io::Result<Vec<u64>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(target) = std::fs::read_link(entry?.path()) else { continue };
        out.extend(socket_inode(&target.to_string_lossy()));
    }
    Ok(out)
}

/// Resident memory of process `pid`, in bytes (from `/proc/<pid>/statm`).
pub(crate) fn rss(pid: u32) -> io::Result<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm"))?;
    let pages = statm_resident_pages(&statm).ok_or_else(|| unexpected("/proc/<pid>/statm"))?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Ok(pages * u64::try_from(page).unwrap_or(4096))
}

fn unexpected(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("unexpected {what} format"))
}

/// Clock ticks per second, the unit of `/proc/<pid>/stat`'s times.
fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100).max(1)
}

/// utime + stime, in clock ticks, of a `/proc/<pid>/stat` line. The fields are counted after
/// the command name, which may hold spaces and parentheses (it ends at the last `)`): the
/// state is the 3rd field of the line, utime the 14th, stime the 15th.
fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(14 - 3);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Resident pages, the second field of `/proc/<pid>/statm`.
fn statm_resident_pages(statm: &str) -> Option<u64> {
    statm.split_whitespace().nth(1)?.parse().ok()
}

/// The inode of a `/proc/<pid>/fd/N` link to a socket (`socket:[12345]`).
fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_read_after_a_command_name_with_spaces_and_parentheses() {
        let stat = "4242 (a (weird) name) S 1 4242 4242 0 -1 4194560 1017 0 0 0 37 12 0 0 20 0 3 0 \
                    8312447 1187840 1234 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(stat_cpu_ticks(stat), Some(37 + 12));
        assert_eq!(stat_cpu_ticks("1 (init) S 1 1 1 0 -1 4194560 5 0 0 0 7 8"), Some(15));
        assert_eq!(stat_cpu_ticks("1 (init) S 1 1 1 0 -1 4194560 5 0 0 0 7"), None, "cut short");
        assert_eq!(stat_cpu_ticks("no parenthesis at all"), None);
        assert_eq!(stat_cpu_ticks("1 (x) S 1 1 1 0 -1 0 0 0 0 0 utime 8 0"), None, "not a number");
    }

    #[test]
    fn resident_pages_are_the_second_field_of_statm() {
        assert_eq!(statm_resident_pages("2910 1047 777 153 0 401 0\n"), Some(1047));
        assert_eq!(statm_resident_pages("2910"), None);
        assert_eq!(statm_resident_pages(""), None);
    }

    #[test]
    fn only_socket_links_have_an_inode() {
        assert_eq!(socket_inode("socket:[123456]"), Some(123456));
        assert_eq!(socket_inode("pipe:[123456]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
        assert_eq!(socket_inode("socket:[12"), None);
        assert_eq!(socket_inode("socket:[]"), None);
    }

    #[test]
    fn this_process_is_read_like_any_other() {
        let me = std::process::id();
        assert!(rss(me).unwrap() > 0);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let inode = std::fs::metadata(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&listener)))
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap();
        assert!(socket_inodes(me).unwrap().contains(&inode));
        cpu_time(me).unwrap();
    }
}
