//! `CLUSTER_PID_FILE`: the master's pid, written atomically, removed on exit if it still
//! names this master.

use std::io;
use std::path::Path;

pub(super) fn write(path: &Path) -> io::Result<()> {
    let pid = crate::sys::getpid();
    let tmp = path.with_file_name(format!(
        ".{}.{pid}.tmp",
        path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default()
    ));
    std::fs::write(&tmp, format!("{pid}\n"))?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

pub(super) fn remove(path: &Path) {
    let ours = std::fs::read_to_string(path).is_ok_and(|s| s.trim() == crate::sys::getpid().to_string());
    if ours {
        let _ = std::fs::remove_file(path);
    }
}
