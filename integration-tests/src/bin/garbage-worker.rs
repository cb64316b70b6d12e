//! Test program: a cluster whose worker 2, the first time it starts, writes garbage to its
//! channel instead of speaking the protocol. `GARBAGE_MARKER` is a path created by the
//! misbehaving worker (so its replacement behaves); `GARBAGE_KIND` picks the garbage:
//! `tag` (unknown tag after a valid hello), `fd` (a file descriptor on a message that takes
//! none), `first` (a valid message other than hello first), `version` (a hello of another
//! protocol version), `liar` (a hello naming the pid in `GARBAGE_PID`, then garbage). The hello comes from the library's own encoder. The master's hook prints
//! each worker exit with its reason, for the test to check which error the master saw.

use std::os::fd::AsRawFd;

fn main() {
    misbehave_if_chosen();
    cluster::Cluster::builder().workers(2).master(master).run(serve()).expect("serve");
}

fn misbehave_if_chosen() {
    let (Ok(id), Ok(fd), Ok(marker)) =
        (std::env::var("CLUSTER_UNIQUE_ID"), std::env::var("CLUSTER_CHANNEL_FD"), std::env::var("GARBAGE_MARKER"))
    else {
        return;
    };
    if id != "2" || std::fs::OpenOptions::new().write(true).create_new(true).open(&marker).is_err() {
        return;
    }
    let fd: i32 = fd.parse().expect("fd");
    let hello = cluster::__private::hello(std::process::id());
    match std::env::var("GARBAGE_KIND").as_deref() {
        // A heartbeat (tag 0x09) before any hello.
        Ok("first") => send(fd, b"\x09", None),
        Ok("version") => {
            let mut old = hello.clone();
            old[1..3].copy_from_slice(&1u16.to_be_bytes());
            send(fd, &old, None);
        }
        Ok("fd") => {
            send(fd, &hello, None);
            let file = std::fs::File::open("/dev/null").expect("/dev/null");
            send(fd, b"\x03\x00\x00\x00\x01", Some(file.as_raw_fd()));
        }
        // A hello that names another process (`GARBAGE_PID`), then garbage: the master must
        // kill the worker it started, never the pid it was told.
        Ok("liar") => {
            let other: u32 = std::env::var("GARBAGE_PID").expect("GARBAGE_PID").parse().expect("a pid");
            send(fd, &cluster::__private::hello(other), None);
            send(fd, b"\x7fgarbage", None);
        }
        _ => {
            send(fd, &hello, None);
            send(fd, b"\x7fgarbage", None);
        }
    }
    // Hang: the master must kill us.
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

/// Raw `sendmsg`, optionally with one fd attached.
fn send(sock: i32, data: &[u8], fd: Option<i32>) {
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut _, iov_len: data.len() };
    let mut control = [0u64; 8];
    // SAFETY: a zeroed msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        // SAFETY: `control` has room and alignment for one cmsghdr with one int.
        unsafe {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(4) as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(4) as _;
            libc::CMSG_DATA(cmsg).cast::<i32>().write_unaligned(fd);
        }
    }
    // SAFETY: `msg` is fully initialised.
    let n = unsafe { libc::sendmsg(sock, &msg, 0) };
    assert!(n >= 0, "sendmsg: {}", std::io::Error::last_os_error());
}

async fn master(mut m: cluster::Master) {
    while let Some(event) = m.recv().await {
        if let cluster::master::Event::Exit(exit) = event {
            let reason = exit.reason.map(|r| r.to_string()).unwrap_or_default();
            println!("exit of worker {}: {reason}", exit.id);
        }
    }
}

async fn serve() -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut listener = cluster::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("worker {:?} listening on http://{}", cluster::worker::id(), listener.local_addr()?);
    loop {
        let (mut stream, _) = tokio::select! {
            conn = listener.accept() => conn?,
            _ = cluster::worker::shutdown() => return Ok(()),
        };
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf).await;
            let body = format!("{{\"id\":{},\"pid\":{}}}", cluster::worker::id().unwrap_or(0), std::process::id());
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len());
            let _ = stream.write_all(format!("{head}{body}").as_bytes()).await;
        });
    }
}
