//! TLS: upstream client configuration, and listener certificates chosen by SNI with reload,
//! with optional verification of client certificates (mTLS).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::ClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ClientHello, ResolvesServerCert, ServerConfig, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use turnpike_model::{
    CertificateConfig, ClientAuthConfig, ClientAuthMode, ListenerTls, UpstreamTls,
};

/// The crypto provider used everywhere in the workspace.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a PEM certificate chain.
pub fn load_certs(path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read certificates from `{path}`: {e}"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("invalid certificate in `{path}`: {e}"))?;
    if certs.is_empty() {
        return Err(format!("no certificate found in `{path}`"));
    }
    Ok(certs)
}

/// Reads a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| format!("cannot read private key from `{path}`: {e}"))
}

/// Client TLS for an upstream: trusted roots, optional client certificate, ALPN.
pub fn client_config(cfg: &UpstreamTls, http2: bool) -> Result<ClientConfig, String> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?;
    let builder = if cfg.insecure_skip_verify {
        tracing::warn!("upstream TLS verification is disabled (insecure_skip_verify)");
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
    } else {
        let mut roots = rustls::RootCertStore::empty();
        match &cfg.ca {
            Some(ca) => {
                for cert in load_certs(ca)? {
                    roots
                        .add(cert)
                        .map_err(|e| format!("invalid CA certificate in `{ca}`: {e}"))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        builder.with_root_certificates(roots)
    };
    let mut config = match (&cfg.client_cert, &cfg.client_key) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|e| format!("invalid client certificate or key: {e}"))?,
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = if http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(config)
}

/// Accepts any server certificate (`insecure_skip_verify`), still checking signatures so the
/// handshake itself stays sound.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Server certificates indexed by name, built once per (re)load and never mutated, so a
/// handshake always sees one consistent set.
#[derive(Debug)]
pub struct CertificateSet {
    /// Exact names (lowercase) to the first certificate that lists them.
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` stored as `example.com`; matches exactly one extra label.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    /// The first configured certificate: for clients without SNI or with an unknown name.
    default: Arc<CertifiedKey>,
}

impl CertificateSet {
    /// Loads every certificate and key; any failure rejects the whole set so a reload never
    /// leaves a listener with a partial set.
    pub fn load(certs: &[CertificateConfig]) -> Result<Self, String> {
        let provider = provider();
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        let mut default = None;
        for cfg in certs {
            let chain = load_certs(&cfg.cert)?;
            let key = load_key(&cfg.key)?;
            let names = if cfg.server_names.is_empty() {
                san_dns_names(&chain[0], &cfg.cert)?
            } else {
                cfg.server_names.clone()
            };
            let certified = CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
                format!(
                    "certificate `{}` and key `{}` do not form a usable pair: {e}",
                    cfg.cert, cfg.key
                )
            })?;
            let certified = Arc::new(certified);
            for name in names {
                let name = normalize_name(&name);
                // "The first whose names match wins": never overwrite an earlier entry.
                match name.strip_prefix("*.") {
                    Some(suffix) => wildcard
                        .entry(suffix.to_owned())
                        .or_insert_with(|| Arc::clone(&certified)),
                    None => exact.entry(name).or_insert_with(|| Arc::clone(&certified)),
                };
            }
            default.get_or_insert(certified);
        }
        let default = default.ok_or_else(|| "no certificate configured".to_owned())?;
        Ok(Self {
            exact,
            wildcard,
            default,
        })
    }

    /// The certificate for a server name: exact match, then a one-label wildcard, then the
    /// default.
    pub fn resolve_name(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let Some(sni) = sni else {
            return Arc::clone(&self.default);
        };
        let name = normalize_name(sni);
        if let Some(found) = self.exact.get(&name) {
            return Arc::clone(found);
        }
        if let Some((_, parent)) = name.split_once('.')
            && let Some(found) = self.wildcard.get(parent)
        {
            return Arc::clone(found);
        }
        Arc::clone(&self.default)
    }
}

/// Lowercase without a trailing dot, the form names are indexed under.
fn normalize_name(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// DNS names from the certificate's subject alternative names.
fn san_dns_names(cert: &CertificateDer<'_>, path: &str) -> Result<Vec<String>, String> {
    let parsed = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| format!("cannot parse certificate `{path}`: {e}"))?;
    let names: Vec<String> = parsed.valid_dns_names().map(str::to_owned).collect();
    if names.is_empty() {
        return Err(format!(
            "certificate `{path}` has no DNS subject alternative name; set `server_names`"
        ));
    }
    Ok(names)
}

/// Chooses the certificate by SNI from a set that can be swapped atomically at any time.
#[derive(Debug)]
pub struct SniResolver {
    set: ArcSwap<CertificateSet>,
}

impl SniResolver {
    /// A resolver serving `set`.
    pub fn new(set: CertificateSet) -> Self {
        Self {
            set: ArcSwap::from_pointee(set),
        }
    }

    /// Replaces the whole set; handshakes already past certificate selection are unaffected.
    pub fn store(&self, set: CertificateSet) {
        self.set.store(Arc::new(set));
    }

    /// The set in use now.
    pub fn current(&self) -> Arc<CertificateSet> {
        self.set.load_full()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.set.load().resolve_name(client_hello.server_name()))
    }
}

/// What identifies a version of a file cheaply: modification time and length.
type FileStamp = Option<(SystemTime, u64)>;

fn stamp(path: &str) -> FileStamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// The verifier of client certificates for a listener's `client_auth`: the CA bundle as
/// trust anchors, the CRLs if any. Errors name the field and the file.
pub fn client_verifier(cfg: &ClientAuthConfig) -> Result<Arc<dyn ClientCertVerifier>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(&cfg.ca).map_err(|e| format!("tls.client_auth.ca: {e}"))? {
        roots.add(cert).map_err(|e| {
            format!(
                "tls.client_auth.ca: invalid CA certificate in `{}`: {e}",
                cfg.ca
            )
        })?;
    }
    let mut crls = Vec::new();
    for (i, path) in cfg.crls.iter().enumerate() {
        let found = CertificateRevocationListDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("tls.client_auth.crls[{i}]: cannot read `{path}`: {e}"))?;
        if found.is_empty() {
            return Err(format!(
                "tls.client_auth.crls[{i}]: no CRL found in `{path}`"
            ));
        }
        crls.extend(found);
    }
    let mut builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
    if !crls.is_empty() {
        // Only the issuers the operator gave CRLs for are checked; without this, every
        // certificate of a CA with no CRL here would be refused as of unknown status.
        builder = builder.with_crls(crls).allow_unknown_revocation_status();
    }
    if cfg.mode == ClientAuthMode::Optional {
        builder = builder.allow_unauthenticated();
    }
    builder.build().map_err(|e| format!("tls.client_auth: {e}"))
}

/// A listener's certificates: the configured files, the live resolver and server
/// configuration, and what was last loaded, so periodic checks only reload when a file
/// changed.
#[derive(Debug)]
pub struct ServerCertificates {
    listener: String,
    configs: Vec<CertificateConfig>,
    client_auth: Option<ClientAuthConfig>,
    resolver: Arc<SniResolver>,
    /// Replaced when the client CA bundle or CRLs are reloaded. A new configuration also
    /// has a new session cache, so no session verified against the old trust anchors is
    /// resumed (resumption skips client certificate verification).
    server: ArcSwap<ServerConfig>,
    /// Stamps of the files behind the live set, and of the last version that failed to load
    /// (so a broken file is reported once, not at every check).
    stamps: Mutex<(Vec<FileStamp>, Option<Vec<FileStamp>>)>,
}

impl ServerCertificates {
    /// Loads the certificates (and the client CA bundle) of listener `listener`; errors
    /// name the listener, the field and the file.
    pub fn load(listener: &str, cfg: &ListenerTls) -> Result<Self, String> {
        let at = |e: String| format!("listener `{listener}`: {e}");
        let stamps = Self::stamps_of(&cfg.certificates, cfg.client_auth.as_ref());
        let set = CertificateSet::load(&cfg.certificates).map_err(at)?;
        let verifier = cfg
            .client_auth
            .as_ref()
            .map(client_verifier)
            .transpose()
            .map_err(at)?;
        let resolver = Arc::new(SniResolver::new(set));
        let server = server_config(Arc::clone(&resolver), verifier).map_err(at)?;
        Ok(Self {
            listener: listener.to_owned(),
            configs: cfg.certificates.clone(),
            client_auth: cfg.client_auth.clone(),
            resolver,
            server: ArcSwap::from_pointee(server),
            stamps: Mutex::new((stamps, None)),
        })
    }

    fn stamps_of(
        configs: &[CertificateConfig],
        client_auth: Option<&ClientAuthConfig>,
    ) -> Vec<FileStamp> {
        let client_files = client_auth
            .into_iter()
            .flat_map(|c| std::iter::once(&c.ca).chain(&c.crls));
        configs
            .iter()
            .flat_map(|c| [&c.cert, &c.key])
            .chain(client_files)
            .map(|path| stamp(path))
            .collect()
    }

    /// The resolver installed in the server configuration.
    pub fn resolver(&self) -> Arc<SniResolver> {
        Arc::clone(&self.resolver)
    }

    /// The server configuration for a new connection.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.load_full()
    }

    /// Loads all files again and swaps the set (and the client verifier); on error the
    /// running ones stay.
    pub fn reload(&self) -> Result<(), String> {
        // Stamp before reading: a write racing with the read changes the stamp again and is
        // picked up by the next check.
        let stamps = Self::stamps_of(&self.configs, self.client_auth.as_ref());
        let result = CertificateSet::load(&self.configs).and_then(|set| {
            let verifier = self.client_auth.as_ref().map(client_verifier).transpose()?;
            let server = verifier
                .map(|v| server_config(Arc::clone(&self.resolver), Some(v)))
                .transpose()?;
            Ok((set, server))
        });
        let mut guard = self.stamps.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok((set, server)) => {
                self.resolver.store(set);
                if let Some(server) = server {
                    self.server.store(Arc::new(server));
                }
                *guard = (stamps, None);
                tracing::info!(listener = %self.listener, "TLS certificates reloaded");
                Ok(())
            }
            Err(e) => {
                guard.1 = Some(stamps);
                Err(format!("listener `{}`: {e}", self.listener))
            }
        }
    }

    /// Reloads when a file's modification time or length changed since the last load.
    /// Returns whether a new set was installed; a broken file keeps the running set and is
    /// reported once per distinct version.
    pub fn reload_if_changed(&self) -> Result<bool, String> {
        let now = Self::stamps_of(&self.configs, self.client_auth.as_ref());
        {
            let guard = self.stamps.lock().unwrap_or_else(|p| p.into_inner());
            if guard.0 == now || guard.1.as_ref() == Some(&now) {
                return Ok(false);
            }
        }
        self.reload().map(|()| true)
    }
}

/// Server TLS for a listener: certificates by SNI, ALPN `h2` then `http/1.1`, client
/// certificates verified by `client_auth` when given.
pub fn server_config(
    resolver: Arc<SniResolver>,
    client_auth: Option<Arc<dyn ClientCertVerifier>>,
) -> Result<ServerConfig, String> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?;
    let builder = match client_auth {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}
