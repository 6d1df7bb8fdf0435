//! RFC 5424 syslog over UDP, TCP (RFC 6587 octet counting) or a unix datagram socket. The
//! message is the JSON record; severity follows the status class.

use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UdpSocket};
use turnpike_model::observe::access_log::{SyslogSink, SyslogTransport};

use super::format::{Formatter, rfc3339_ms};
use super::worker::Deliver;
use crate::CallEvent;

enum Conn {
    None,
    Udp(UdpSocket),
    Tcp(TcpStream),
    #[cfg(unix)]
    Unix(tokio::net::UnixDatagram),
}

pub(crate) struct SyslogWriter {
    address: String,
    transport: SyslogTransport,
    facility: u8,
    app_name: String,
    hostname: String,
    timeout: std::time::Duration,
    conn: Conn,
}

/// The machine's name for the HOSTNAME field (`-`, the nil value, when unknown).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty() && h.len() <= 255 && h.bytes().all(|b| (33..=126).contains(&b)))
        .unwrap_or_else(|| "-".into())
}

impl SyslogWriter {
    pub(crate) fn new(cfg: &SyslogSink) -> Self {
        Self {
            address: cfg.address.clone(),
            transport: cfg.transport,
            facility: cfg.facility,
            app_name: cfg.app_name.clone(),
            hostname: hostname(),
            timeout: cfg.timeout,
            conn: Conn::None,
        }
    }

    /// One RFC 5424 message: `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - MSG`.
    pub(crate) fn message(&self, e: &CallEvent, fmt: &Formatter) -> String {
        let severity = match e.status {
            500.. => 3,     // error
            400..=499 => 4, // warning
            _ => 6,         // informational
        };
        let pri = u32::from(self.facility) * 8 + severity;
        format!(
            "<{pri}>1 {} {} {} {} access - {}",
            rfc3339_ms(e.time_unix_ms),
            self.hostname,
            self.app_name,
            std::process::id(),
            fmt.line(e)
        )
    }

    async fn connect(&mut self) -> Result<(), String> {
        if !matches!(self.conn, Conn::None) {
            return Ok(());
        }
        let addr = &self.address;
        self.conn = match self.transport {
            SyslogTransport::Udp => {
                let target = tokio::net::lookup_host(addr)
                    .await
                    .map_err(|e| format!("{addr}: {e}"))?
                    .next()
                    .ok_or_else(|| format!("{addr}: no address"))?;
                let local = if target.is_ipv4() {
                    "0.0.0.0:0"
                } else {
                    "[::]:0"
                };
                let sock = UdpSocket::bind(local)
                    .await
                    .map_err(|e| format!("udp bind: {e}"))?;
                sock.connect(target)
                    .await
                    .map_err(|e| format!("{addr}: {e}"))?;
                Conn::Udp(sock)
            }
            SyslogTransport::Tcp => Conn::Tcp(
                TcpStream::connect(addr)
                    .await
                    .map_err(|e| format!("{addr}: {e}"))?,
            ),
            #[cfg(unix)]
            SyslogTransport::Unix => {
                let sock =
                    tokio::net::UnixDatagram::unbound().map_err(|e| format!("unix socket: {e}"))?;
                sock.connect(addr).map_err(|e| format!("{addr}: {e}"))?;
                Conn::Unix(sock)
            }
            #[cfg(not(unix))]
            SyslogTransport::Unix => return Err("unix sockets are not available here".into()),
        };
        Ok(())
    }

    async fn send_all(&mut self, messages: &[String]) -> Result<(), String> {
        let timeout = self.timeout;
        tokio::time::timeout(timeout, self.connect())
            .await
            .map_err(|_| format!("{}: cannot connect in {timeout:?}", self.address))??;
        match &mut self.conn {
            Conn::None => Err("not connected".into()),
            Conn::Udp(s) => {
                for m in messages {
                    s.send(m.as_bytes()).await.map_err(|e| e.to_string())?;
                }
                Ok(())
            }
            #[cfg(unix)]
            Conn::Unix(s) => {
                for m in messages {
                    s.send(m.as_bytes()).await.map_err(|e| e.to_string())?;
                }
                Ok(())
            }
            Conn::Tcp(s) => {
                let mut buf = Vec::new();
                for m in messages {
                    buf.extend_from_slice(format!("{} ", m.len()).as_bytes());
                    buf.extend_from_slice(m.as_bytes());
                }
                // The timeout is on progress, not on the whole batch: a slow receiver that
                // keeps reading is not cut off, one that stops is.
                for chunk in buf.chunks(64 * 1024) {
                    tokio::time::timeout(timeout, s.write_all(chunk))
                        .await
                        .map_err(|_| format!("{}: no progress in {timeout:?}", self.address))?
                        .map_err(|e| e.to_string())?;
                }
                s.flush().await.map_err(|e| e.to_string())
            }
        }
    }
}

impl Deliver for SyslogWriter {
    async fn deliver(&mut self, events: &[Arc<CallEvent>], fmt: &Formatter) -> Result<(), String> {
        let messages: Vec<String> = events.iter().map(|e| self.message(e, fmt)).collect();
        let result = self.send_all(&messages).await;
        if result.is_err() {
            // Connect again next time: the receiver may have restarted, and after a timeout
            // a TCP stream may hold half a frame.
            self.conn = Conn::None;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use turnpike_model::observe::access_log::AccessField;

    #[tokio::test]
    async fn tcp_uses_octet_counting() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut w = SyslogWriter::new(&SyslogSink {
            address: addr.to_string(),
            transport: SyslogTransport::Tcp,
            facility: 1,
            app_name: "tp".into(),
            timeout: std::time::Duration::from_secs(5),
        });
        let fmt = Formatter::new(&[AccessField::Status], None);
        let mut e = crate::tests::event();
        e.status = 503;
        let events = vec![Arc::new(e)];
        let accept = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut s, &mut buf)
                .await
                .unwrap();
            String::from_utf8(buf).unwrap()
        });
        w.deliver(&events, &fmt).await.unwrap();
        w.conn = Conn::None; // closes the stream so the reader sees the end
        let got = accept.await.unwrap();
        let (len, msg) = got.split_once(' ').unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), msg.len());
        // facility 1 * 8 + severity 3 (error)
        assert!(msg.starts_with("<11>1 1970-01-01T00:00:00.000Z "), "{msg}");
        assert!(msg.contains(" tp "), "{msg}");
        assert!(msg.ends_with(r#" access - {"status":503}"#), "{msg}");
    }

    /// A TCP receiver that accepts but never reads: once the socket buffers are full the
    /// batch fails after `timeout` instead of stalling the sink, and the next batch connects
    /// again rather than continuing half a frame.
    #[tokio::test]
    async fn tcp_receiver_that_never_reads_times_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted_tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                accepted_tx.send(s).unwrap(); // kept open, never read
            }
        });
        let mut w = SyslogWriter::new(&SyslogSink {
            address: addr.to_string(),
            transport: SyslogTransport::Tcp,
            facility: 1,
            app_name: "tp".into(),
            timeout: std::time::Duration::from_millis(200),
        });
        let fmt = Formatter::new(&[AccessField::Status], None);
        // Far more than loopback socket buffers hold, in one batch.
        let mut e = crate::tests::event();
        e.user_agent = Some("x".repeat(64 * 1024));
        let fmt_all = Formatter::new(&[AccessField::Status, AccessField::UserAgent], None);
        let events: Vec<_> = (0..400).map(|_| Arc::new(e.clone())).collect();
        let err = w.deliver(&events, &fmt_all).await.unwrap_err();
        assert!(err.contains("no progress"), "{err}");
        assert!(matches!(w.conn, Conn::None));
        let _first = accepted.recv().await.unwrap();
        // The next batch opens a new connection.
        let small = vec![Arc::new(crate::tests::event())];
        w.deliver(&small, &fmt).await.unwrap();
        let _second = accepted.recv().await.unwrap();
    }
}
