//! Shared memory between the master and one worker: a sealed memfd of a fixed size, mapped by
//! both, seen as an array of `AtomicU64` words (`metrics/segment.rs` gives the words a layout).
//! Every access of the other process's words goes through atomics, so a worker writing its
//! segment while the master reads it is no data race, and the seals (no shrinking, no growing)
//! mean a worker cannot truncate the file under the master's mapping.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::AtomicU64;

use super::check;

/// A mapping of a shared segment, unmapped when dropped.
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: std::ptr::NonNull<AtomicU64>,
    words: usize,
}

// SAFETY: the mapping is plain memory of atomics, valid until drop; sharing it between threads
// is what atomics are for.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// The segment's words.
    pub(crate) fn words(&self) -> &[AtomicU64] {
        // SAFETY: `ptr` points at `words` u64s mapped readable and writable, page-aligned (so
        // aligned for AtomicU64, which has u64's size), alive for as long as `self` is; they
        // are only ever accessed as atomics, here and in the other process.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.words) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the region was mapped by `map` with this length and is not used after this.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.words * 8) };
    }
}

/// Creates a segment of `words` zeroed words, sealed against shrinking and growing.
pub(crate) fn create_segment(name: &str, words: usize) -> io::Result<OwnedFd> {
    let name = std::ffi::CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a valid C string; the returned descriptor is owned below.
    let fd = check(unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) })?;
    // SAFETY: `fd` was just created and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = libc::off_t::try_from(words * 8).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: ftruncate and fcntl on a descriptor this process owns.
    unsafe {
        check(libc::ftruncate(fd.as_raw_fd(), len))?;
        check(libc::fcntl(
            fd.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
        ))?;
    }
    Ok(fd)
}

/// Maps `words` words of the segment `fd` (checked: it must be a sealed memfd at least that
/// large, so that no access can fault).
pub(crate) fn map_segment(fd: &OwnedFd, words: usize) -> io::Result<Mapping> {
    let len = words.checked_mul(8).filter(|l| *l > 0).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: fcntl only reads the descriptor's seals.
    let seals = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) })?;
    if seals & libc::F_SEAL_SHRINK == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "the segment is not sealed against shrinking"));
    }
    // SAFETY: an all-zero `stat` is a valid value of the plain C struct.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into `stat` only.
    check(unsafe { libc::fstat(fd.as_raw_fd(), &mut stat) })?;
    if (stat.st_size as u64) < len as u64 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "the segment is smaller than said"));
    }
    // SAFETY: a new shared mapping of a file this process holds; the kernel picks the address.
    let ptr = unsafe {
        libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd.as_raw_fd(), 0)
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let ptr = std::ptr::NonNull::new(ptr.cast()).ok_or_else(|| io::Error::from(io::ErrorKind::Other))?;
    Ok(Mapping { ptr, words })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    #[test]
    fn two_mappings_of_a_segment_see_each_other_and_it_cannot_shrink() {
        let fd = create_segment("test", 512).unwrap();
        let a = map_segment(&fd, 512).unwrap();
        let b = map_segment(&fd.try_clone().unwrap(), 512).unwrap();
        a.words()[7].store(42, Ordering::Release);
        assert_eq!(b.words()[7].load(Ordering::Acquire), 42);
        assert!(b.words().iter().enumerate().all(|(i, w)| i == 7 || w.load(Ordering::Relaxed) == 0), "zeroed");
        // SAFETY: ftruncate on a descriptor the test owns.
        let shrunk = unsafe { libc::ftruncate(fd.as_raw_fd(), 8) };
        assert_eq!(shrunk, -1, "sealed against shrinking");
        assert!(map_segment(&fd, 513).is_err(), "larger than it is");
        assert!(map_segment(&fd, 0).is_err());
    }
}
