//! Encoders, one function per message, for both directions: each appends one message to `out`
//! from borrowed parts (the master keeps ownership of each connection it hands over until it
//! is acknowledged, so nothing is moved into a message value to be written). The layouts are
//! in `message.rs`, which decodes them.

use std::net::SocketAddr;

use bytes::{BufMut, BytesMut};

use super::message::{ConnId, Endpoint, ListenKey, MAX_FDS, MAX_MESSAGE, NewConn, UserTags, tag};

// ----- master to worker -----

/// A listen reply; attach the socket's fd when `with_fd`.
pub(crate) fn listen_reply(
    out: &mut BytesMut,
    req: u32,
    result: &Result<(ListenKey, Option<SocketAddr>), i32>,
    with_fd: bool,
) {
    out.put_u8(tag::LISTEN_REPLY);
    out.put_u32(req);
    match result {
        Ok((key, addr)) => {
            out.put_u8(0);
            out.put_u32(*key);
            put_opt_addr(out, addr.as_ref());
            out.put_u8(u8::from(with_fd));
        }
        Err(errno) => {
            out.put_u8(1);
            out.put_i32(*errno);
        }
    }
}

/// Starts a `NewConn` message; follow with [`newconn_entry`] once per connection, in the
/// order of the file descriptors attached.
pub(crate) fn newconn_header(out: &mut BytesMut, key: ListenKey, count: usize) {
    conns_header(out, tag::NEWCONN, key, count);
}

pub(crate) fn newconn_entry(out: &mut BytesMut, id: ConnId, peer: Option<&SocketAddr>) {
    out.put_u64(id);
    put_opt_addr(out, peer);
}

pub(crate) fn metrics(out: &mut BytesMut, words: u32) {
    out.put_u8(tag::METRICS);
    out.put_u32(words);
}

pub(crate) fn disconnect(out: &mut BytesMut) {
    out.put_u8(tag::DISCONNECT);
}

/// A whole user message, or the first fragment of one of `total` bytes.
pub(crate) fn user(out: &mut BytesMut, dir: UserTags, peer: u32, call: u32, total: Option<u32>, data: &[u8]) {
    out.put_u8(if total.is_some() { dir.start } else { dir.single });
    out.put_u32(peer);
    out.put_u32(call);
    if let Some(total) = total {
        out.put_u32(total);
    }
    out.put_slice(data);
}

pub(crate) fn relayed(out: &mut BytesMut, delivered: bool) {
    out.put_u8(tag::RELAYED);
    out.put_u8(delivered.into());
}

/// A continuation fragment.
pub(crate) fn user_more(out: &mut BytesMut, dir: UserTags, data: &[u8]) {
    out.put_u8(dir.more);
    out.put_slice(data);
}

// ----- worker to master -----

/// The first message of every worker.
pub(crate) fn hello(out: &mut BytesMut, version: u16, pid: u32) {
    out.put_u8(tag::HELLO);
    out.put_u16(version);
    out.put_u32(pid);
}

/// Asks the master for a listening socket; `index` tells apart several port-0 binds.
pub(crate) fn listen(out: &mut BytesMut, req: u32, endpoint: &Endpoint, index: u32) {
    out.put_u8(tag::LISTEN);
    out.put_u32(req);
    put_endpoint(out, endpoint);
    out.put_u32(index);
}

pub(crate) fn listening(out: &mut BytesMut, key: ListenKey) {
    out.put_u8(tag::LISTENING);
    out.put_u32(key);
}

pub(crate) fn unlisten(out: &mut BytesMut, key: ListenKey) {
    out.put_u8(tag::UNLISTEN);
    out.put_u32(key);
}

pub(crate) fn refused(out: &mut BytesMut, ids: &[ConnId]) {
    put_ids(out, tag::REFUSED, ids);
}

pub(crate) fn busy(out: &mut BytesMut, ids: &[ConnId]) {
    put_ids(out, tag::BUSY, ids);
}

/// The worker is about to exit (panic hook). Long messages are cut at a character boundary
/// so they fit one datagram.
pub(crate) fn exiting(out: &mut BytesMut, reason: &str) {
    out.put_u8(tag::EXITING);
    let mut end = reason.len().min(MAX_MESSAGE - 16);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    out.put_slice(&reason.as_bytes()[..end]);
}

pub(crate) fn heartbeat(out: &mut BytesMut) {
    out.put_u8(tag::HEARTBEAT);
}

pub(crate) fn ready(out: &mut BytesMut) {
    out.put_u8(tag::READY);
}

pub(crate) fn stop_asked(out: &mut BytesMut) {
    out.put_u8(tag::STOP_ASKED);
}

pub(crate) fn closed(out: &mut BytesMut, count: u32) {
    out.put_u8(tag::CLOSED);
    out.put_u32(count);
}

// ----- both -----

/// Encodes `Accepted` for up to [`MAX_FDS`] connections (the worker's accept path reuses
/// `out`, which is cleared first).
pub(crate) fn accepted(out: &mut BytesMut, closed: u32, ids: impl ExactSizeIterator<Item = ConnId>) {
    debug_assert!(ids.len() <= MAX_FDS);
    out.clear();
    out.put_u8(tag::ACCEPTED);
    out.put_u32(closed);
    out.put_u16(ids.len() as u16);
    for id in ids {
        out.put_u64(id);
    }
}

/// Encodes `Returned` from borrowed connections (the same layout as `NewConn`); the sender
/// attaches their descriptors in this order.
pub(crate) fn returned(out: &mut BytesMut, key: ListenKey, conns: &[NewConn]) {
    conns_header(out, tag::RETURNED, key, conns.len());
    for conn in conns {
        newconn_entry(out, conn.id, conn.peer.as_ref());
    }
}

/// The head of a `newconn` or `returned`; one `newconn_entry` per connection follows.
fn conns_header(out: &mut BytesMut, t: u8, key: ListenKey, count: usize) {
    debug_assert!(count <= MAX_FDS);
    out.put_u8(t);
    out.put_u32(key);
    out.put_u16(count as u16);
}

fn put_ids(out: &mut BytesMut, t: u8, ids: &[ConnId]) {
    out.put_u8(t);
    out.put_u16(ids.len() as u16);
    for id in ids {
        out.put_u64(*id);
    }
}

/// Family byte 0 stands for "no address" (a Unix socket peer).
fn put_opt_addr(out: &mut BytesMut, addr: Option<&SocketAddr>) {
    match addr {
        Some(addr) => put_addr(out, addr),
        None => out.put_u8(0),
    }
}

fn put_endpoint(out: &mut BytesMut, endpoint: &Endpoint) {
    use std::os::unix::ffi::OsStrExt;
    match endpoint {
        Endpoint::Tcp(addr) => {
            out.put_u8(1);
            put_addr(out, addr);
        }
        Endpoint::Udp(addr) => {
            out.put_u8(2);
            put_addr(out, addr);
        }
        Endpoint::Unix { path, mode } => {
            out.put_u8(3);
            out.put_u32(mode.unwrap_or(u32::MAX));
            let bytes = path.as_os_str().as_bytes();
            out.put_u16(bytes.len().min(usize::from(u16::MAX)) as u16);
            out.put_slice(&bytes[..bytes.len().min(usize::from(u16::MAX))]);
        }
    }
}

fn put_addr(out: &mut BytesMut, addr: &SocketAddr) {
    match addr {
        SocketAddr::V4(a) => {
            out.put_u8(4);
            out.put_slice(&a.ip().octets());
            out.put_u16(a.port());
        }
        SocketAddr::V6(a) => {
            out.put_u8(6);
            out.put_slice(&a.ip().octets());
            out.put_u16(a.port());
            out.put_u32(a.flowinfo());
            out.put_u32(a.scope_id());
        }
    }
}
