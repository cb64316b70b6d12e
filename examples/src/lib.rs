//! Code shared by the example programs.

/// `HOST:PORT` from the environment (defaults 127.0.0.1 and 8080): where every example listens.
pub fn listen_addr() -> String {
    let host = std::env::var("HOST").unwrap_or_else(|_| "127.0.0.1".into());
    let port = std::env::var("PORT").unwrap_or_else(|_| "8080".into());
    format!("{host}:{port}")
}

/// The benchmark responder, shared by `bench-server` (clustered) and `plain-reuseport` (no
/// framework) so both run the identical handler.
pub mod bench {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 12\r\n\r\nhello world\n";
    const RESPONSE_CLOSE: &[u8] =
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 12\r\nconnection: close\r\n\r\nhello world\n";

    /// Answers every complete request head in the buffer; pipelined requests are answered in order.
    pub async fn serve(mut stream: TcpStream) -> std::io::Result<()> {
        let _ = stream.set_nodelay(true);
        let mut buf = Vec::with_capacity(4096);
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
            while let Some(end) = find(&buf, b"\r\n\r\n") {
                let close = wants_close(&buf[..end]);
                stream.write_all(if close { RESPONSE_CLOSE } else { RESPONSE }).await?;
                if close {
                    return Ok(());
                }
                buf.drain(..end + 4);
            }
        }
    }

    fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
        haystack.windows(needle.len()).position(|w| w == needle)
    }

    fn wants_close(head: &[u8]) -> bool {
        head.split(|b| *b == b'\n').skip(1).any(|line| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            line.len() >= 11
                && line[..11].eq_ignore_ascii_case(b"connection:")
                && line[11..].trim_ascii().eq_ignore_ascii_case(b"close")
        })
    }
}
