//! The identity of a verified client certificate (mTLS), read once per connection.
//!
//! rustls verifies the chain during the handshake (`tls::client_verifier`); what is left is
//! to read the leaf's names so that the `mtls` policy can map them to an application and
//! pass them upstream. Parsing uses `x509-parser`; the subject is rendered as RFC 4514
//! prescribes (last RDN first, `,` between RDNs, `+` inside one, RFC 4514 escaping), so the
//! string an operator writes in a credential is the one `openssl x509 -subject -nameopt
//! RFC2253` prints.

use std::fmt::Write as _;
use std::net::IpAddr;

use sha2::{Digest, Sha256};
use x509_parser::asn1_rs::ToDer;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate, X509Name};

/// One subject alternative name of a client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum San {
    /// `dNSName`, lower-cased (DNS names compare without case).
    Dns(String),
    /// `uniformResourceIdentifier` (SPIFFE ids among them).
    Uri(String),
    /// `rfc822Name`.
    Email(String),
    /// `iPAddress`.
    Ip(IpAddr),
}

impl San {
    /// The type prefix used in credentials and upstream headers (`DNS`, `URI`, `email`, `IP`).
    pub fn kind(&self) -> &'static str {
        match self {
            San::Dns(_) => "DNS",
            San::Uri(_) => "URI",
            San::Email(_) => "email",
            San::Ip(_) => "IP",
        }
    }

    /// The value without its type.
    pub fn value(&self) -> String {
        match self {
            San::Dns(v) | San::Uri(v) | San::Email(v) => v.clone(),
            San::Ip(ip) => ip.to_string(),
        }
    }
}

/// What the gateway knows about the verified leaf certificate of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// Subject distinguished name, RFC 4514.
    pub subject: String,
    /// Subject alternative names of the supported types, in certificate order.
    pub sans: Vec<San>,
    /// Serial number, upper-case hex without separators.
    pub serial: String,
    /// SHA-256 of the DER certificate, lower-case hex.
    pub fingerprint: String,
    /// `notAfter`, RFC 3339 in UTC.
    pub not_after: String,
    /// See [`ClientCert::san_keys`].
    san_keys: Vec<String>,
}

impl ClientCert {
    /// Reads a DER certificate. rustls has verified it already; an error here means a
    /// certificate webpki accepts but x509-parser cannot read, which the listener treats
    /// as a failed handshake.
    pub fn from_der(der: &[u8]) -> Result<Self, String> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| format!("cannot parse the client certificate: {e}"))?;
        let subject = rfc4514(cert.subject())?;
        let mut sans = Vec::new();
        let ext = cert
            .subject_alternative_name()
            .map_err(|e| format!("cannot read the subject alternative names: {e}"))?;
        for name in ext.iter().flat_map(|e| e.value.general_names.iter()) {
            match name {
                GeneralName::DNSName(d) => sans.push(San::Dns(d.to_ascii_lowercase())),
                GeneralName::URI(u) => sans.push(San::Uri((*u).to_owned())),
                GeneralName::RFC822Name(m) => sans.push(San::Email((*m).to_owned())),
                GeneralName::IPAddress(b) => {
                    if let Ok(v4) = <[u8; 4]>::try_from(*b) {
                        sans.push(San::Ip(IpAddr::from(v4)));
                    } else if let Ok(v6) = <[u8; 16]>::try_from(*b) {
                        sans.push(San::Ip(IpAddr::from(v6)));
                    }
                }
                _ => {}
            }
        }
        let serial = hex::encode_upper(cert.raw_serial());
        let not_after =
            time::OffsetDateTime::from_unix_timestamp(cert.validity().not_after.timestamp())
                .ok()
                .and_then(|t| {
                    t.format(&time::format_description::well_known::Rfc3339)
                        .ok()
                })
                .unwrap_or_default();
        let san_keys = sans
            .iter()
            .flat_map(|s| {
                let v = s.value();
                [format!("{}:{v}", s.kind()), v]
            })
            .collect();
        Ok(Self {
            subject,
            sans,
            san_keys,
            serial,
            fingerprint: hex::encode(Sha256::digest(der)),
            not_after,
        })
    }

    /// The keys this certificate's SANs are looked up under in `Managed::mtls_sans`, in
    /// certificate order: each SAN typed (`DNS:a.example`), then bare (`a.example`), as
    /// `turnpike_model::managed::mtls_san_key` indexes credentials.
    pub fn san_keys(&self) -> &[String] {
        &self.san_keys
    }
}

/// The short names RFC 4514 §3 defines; other attribute types are written as dotted OIDs.
fn short_name(oid: &str) -> Option<&'static str> {
    Some(match oid {
        "2.5.4.3" => "CN",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "2.5.4.6" => "C",
        "2.5.4.9" => "STREET",
        "0.9.2342.19200300.100.1.25" => "DC",
        "0.9.2342.19200300.100.1.1" => "UID",
        _ => return None,
    })
}

/// An X.509 name as an RFC 4514 string.
fn rfc4514(name: &X509Name<'_>) -> Result<String, String> {
    let rdns: Vec<_> = name.iter_rdn().collect();
    let mut out = String::new();
    // RFC 4514 §2.1: the last RDN of the sequence comes first.
    for (i, rdn) in rdns.iter().rev().enumerate() {
        if i > 0 {
            out.push(',');
        }
        for (j, atv) in rdn.iter().enumerate() {
            if j > 0 {
                out.push('+');
            }
            let oid = atv.attr_type().to_id_string();
            out.push_str(short_name(&oid).unwrap_or(&oid));
            out.push('=');
            match atv.as_str() {
                Ok(s) => escape_value(s, &mut out),
                Err(_) => {
                    // §2.4: a value of a type without a string form is its BER, in hex.
                    let der = atv
                        .attr_value()
                        .to_der_vec()
                        .map_err(|e| format!("cannot encode a subject attribute: {e}"))?;
                    out.push('#');
                    out.push_str(&hex::encode(der));
                }
            }
        }
    }
    Ok(out)
}

/// RFC 4514 §2.4 escaping of an attribute value.
fn escape_value(value: &str, out: &mut String) {
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        match c {
            '"' | '+' | ',' | ';' | '<' | '>' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '#' if i == 0 => out.push_str("\\#"),
            ' ' if i == 0 || i == last => out.push_str("\\ "),
            '\0' => out.push_str("\\00"),
            c => out.push(c),
        }
    }
}

/// `value` with every byte outside printable ASCII written as `\hh` (RFC 4514 allows any
/// character escaped so): header values must be visible ASCII, and a subject may hold UTF-8.
pub fn ascii_escaped(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if (0x20..0x7f).contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "\\{b:02x}");
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};

    #[test]
    fn subject_and_sans_are_read() {
        let mut params = CertificateParams::new(vec!["Svc.Example.com".to_owned()]).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CountryName, "DE");
        dn.push(DnType::OrganizationName, "Acme, Inc.");
        dn.push(DnType::CommonName, "#billing ");
        params.distinguished_name = dn;
        params.subject_alt_names.push(SanType::URI(
            "spiffe://example.org/billing".try_into().unwrap(),
        ));
        params
            .subject_alt_names
            .push(SanType::Rfc822Name("ops@example.com".try_into().unwrap()));
        params
            .subject_alt_names
            .push(SanType::IpAddress("2001:db8::7".parse().unwrap()));
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let parsed = ClientCert::from_der(cert.der()).unwrap();
        assert_eq!(parsed.subject, r"CN=\#billing\ ,O=Acme\, Inc.,C=DE");
        assert_eq!(
            parsed.sans,
            vec![
                San::Dns("svc.example.com".into()),
                San::Uri("spiffe://example.org/billing".into()),
                San::Email("ops@example.com".into()),
                San::Ip("2001:db8::7".parse().unwrap()),
            ]
        );
        let keys = parsed.san_keys();
        assert!(keys.contains(&"DNS:svc.example.com".to_owned()));
        assert!(keys.contains(&"2001:db8::7".to_owned()));
        assert_eq!(parsed.fingerprint, hex::encode(Sha256::digest(cert.der())));
        assert_eq!(parsed.fingerprint.len(), 64);
        assert!(parsed.not_after.ends_with('Z'), "{}", parsed.not_after);
        assert!(!parsed.serial.is_empty());
    }

    #[test]
    fn non_ascii_is_escaped_for_headers() {
        assert_eq!(ascii_escaped("CN=Zoë"), r"CN=Zo\c3\ab");
        assert_eq!(ascii_escaped("CN=a"), "CN=a");
    }
}
