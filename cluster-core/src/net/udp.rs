use std::io;

use tokio::net::{ToSocketAddrs, lookup_host};

use crate::ipc::message::Endpoint;
use crate::worker::client;

/// Role-transparent UDP.
///
/// [`UdpSocket::bind`] returns a plain [`tokio::net::UdpSocket`]. In a worker the master binds
/// the address once and gives every worker that binds it the same socket (as Node's cluster
/// does for `dgram`): the kernel hands each datagram to one of the workers reading it, and
/// replies go out from the shared address. Port 0 gives one port shared by all workers.
#[derive(Debug)]
pub struct UdpSocket {
    _private: (),
}

impl UdpSocket {
    /// Binds (or, in a worker, gets from the master) a UDP socket on the first address `addr`
    /// resolves to that works.
    pub async fn bind(addr: impl ToSocketAddrs) -> io::Result<tokio::net::UdpSocket> {
        let Some(client) = client::client() else { return tokio::net::UdpSocket::bind(addr).await };
        let mut last = None;
        for addr in lookup_host(addr).await? {
            match client.bind(Endpoint::Udp(addr)).await {
                Ok(bound) => {
                    let fd = bound.fd.ok_or_else(|| io::Error::other("the master sent no socket for a UDP bind"))?;
                    let socket = std::net::UdpSocket::from(fd);
                    socket.set_nonblocking(true)?;
                    let socket = tokio::net::UdpSocket::from_std(socket)?;
                    // Counts toward readiness (a reload waits for the new worker's sockets).
                    client.send_listening(bound.key).await?;
                    return Ok(socket);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "address resolved to nothing")))
    }
}
