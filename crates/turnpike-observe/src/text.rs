//! Addresses as text for the sinks, written without `core::fmt` for the common IPv4 case:
//! every logged call formats one or two, and the formatter machinery showed in the
//! profiles of `bench/run.sh observe`.

use std::net::{IpAddr, SocketAddr};

/// Appends `ip` as its `Display` text.
pub fn push_ip(buf: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            let mut digits = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf.push(b'.');
                }
                buf.extend_from_slice(digits.format(octet).as_bytes());
            }
        }
        IpAddr::V6(_) => {
            use std::io::Write as _;
            let _ = write!(buf, "{ip}");
        }
    }
}

/// Appends `addr` as its `Display` text (`1.2.3.4:80`, `[::1]:80`).
pub fn push_socket_addr(buf: &mut Vec<u8>, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(a) => {
            push_ip(buf, IpAddr::V4(*a.ip()));
            buf.push(b':');
            buf.extend_from_slice(itoa::Buffer::new().format(a.port()).as_bytes());
        }
        SocketAddr::V6(_) => {
            use std::io::Write as _;
            let _ = write!(buf, "{addr}");
        }
    }
}

/// `ip` as its `Display` text.
pub fn ip_text(ip: IpAddr) -> String {
    let mut buf = Vec::with_capacity(15);
    push_ip(&mut buf, ip);
    into_string(buf)
}

/// `addr` as its `Display` text.
pub fn socket_addr_text(addr: SocketAddr) -> String {
    let mut buf = Vec::with_capacity(21);
    push_socket_addr(&mut buf, addr);
    into_string(buf)
}

/// Only ASCII digits, dots, colons and brackets were written.
fn into_string(buf: Vec<u8>) -> String {
    String::from_utf8(buf).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_read_as_their_display_text() {
        for ip in [
            "0.0.0.0",
            "10.0.0.1",
            "127.0.0.1",
            "255.255.255.255",
            "::1",
            "fe80::1:2",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_text(ip), ip.to_string());
        }
        for addr in ["1.2.3.4:80", "10.20.30.40:65535", "0.0.0.0:0", "[::1]:8080"] {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(socket_addr_text(addr), addr.to_string());
        }
    }
}
