//! TLS for the API (rustls on aws-lc-rs, the provider the object-store clients already build).
//!
//! Design note.
//! * Reload: the server's certificate comes from a resolver that holds the current certified
//!   key. A task reads the certificate and key every `reload_s`, hashes them, and parses those
//!   same bytes when either changed (contents, not modification times: a renewal copied with its
//!   times kept, or two within the clock's granularity, still counts); a pair that fails to load
//!   (a half-written renewal) is logged and the previous one kept, so a renewal never takes the
//!   API down. Handshakes already under way keep the key they started with.
//! * Mutual TLS: with `client_ca`, client certificates must chain to it (webpki). With
//!   `client_cert_required` a connection without one fails its handshake; otherwise it is
//!   accepted and must authenticate with a bearer token. A verified certificate's DNS names go
//!   into every request of the connection (`PeerCertNames`), which `auth.rs` maps to a tenant.
//! * Only TLS: when TLS is configured the port speaks nothing else; a plain HTTP request fails
//!   the handshake and its connection is closed. Handshakes run in the connection's own task,
//!   bounded by the header read timeout, so a client that opens a connection and stalls holds
//!   nothing but that task.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;

use crate::config::TlsConfig;
use crate::error::ServiceError;

/// The server's current certificate, replaced when its files change.
#[derive(Debug)]
struct Reloading {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

fn tls_error(what: String) -> ServiceError {
    ServiceError::Startup(format!("tls: {what}"))
}

/// The certificate and key files as read once: hashed to see a change, and parsed from these
/// same bytes, so what is served is exactly what was compared.
struct Pair {
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl Pair {
    fn read(cfg: &TlsConfig) -> Result<Pair, ServiceError> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| tls_error(format!("cannot read {}: {e}", p.display())));
        Ok(Pair { cert: read(&cfg.cert)?, key: read(&cfg.key)? })
    }

    fn digest(&self) -> blake3::Hash {
        let mut h = blake3::Hasher::new();
        for bytes in [&self.cert, &self.key] {
            h.update(&(bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        }
        h.finalize()
    }
}

fn load_certified_key(cfg: &TlsConfig, pair: &Pair, provider: &CryptoProvider) -> Result<CertifiedKey, ServiceError> {
    let certs = parse_certs(&cfg.cert, &pair.cert)?;
    let key = PrivateKeyDer::from_pem_slice(&pair.key)
        .map_err(|e| tls_error(format!("cannot read a private key from {}: {e}", cfg.key.display())))?;
    CertifiedKey::from_der(certs, key, provider).map_err(|e| {
        tls_error(format!("{} and {} are not a certificate and its key: {e}", cfg.cert.display(), cfg.key.display()))
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, ServiceError> {
    let bytes = std::fs::read(path).map_err(|e| tls_error(format!("cannot read {}: {e}", path.display())))?;
    parse_certs(path, &bytes)
}

/// The certificates in `pem`, read from `path` (named in errors).
fn parse_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, ServiceError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_error(format!("cannot read certificates from {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(tls_error(format!("{} holds no certificate", path.display())));
    }
    Ok(certs)
}

/// The acceptor for `cfg`, and a task that reloads its certificate while the returned guard
/// lives.
pub fn acceptor(cfg: &TlsConfig) -> Result<(tokio_rustls::TlsAcceptor, ReloadGuard), ServiceError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let pair = Pair::read(cfg)?;
    let first_seen = pair.digest();
    let resolver = Arc::new(Reloading { current: RwLock::new(Arc::new(load_certified_key(cfg, &pair, &provider)?)) });
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error(e.to_string()))?;
    let builder = match &cfg.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in read_certs(ca)? {
                roots.add(c).map_err(|e| tls_error(format!("{}: {e}", ca.display())))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            let verifier = if cfg.client_cert_required { verifier } else { verifier.allow_unauthenticated() };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| tls_error(e.to_string()))?)
        }
    };
    let mut server = builder.with_cert_resolver(resolver.clone());
    server.alpn_protocols = vec![b"http/1.1".to_vec()];

    let (cfg, every) = (cfg.clone(), Duration::from_secs(cfg.reload_s));
    let task = tokio::spawn(async move {
        let mut seen = first_seen;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let (c, p) = (cfg.clone(), provider.clone());
            // None: unchanged, or unreadable for now (a renewal between its renames).
            let changed = tokio::task::spawn_blocking(move || {
                let pair = Pair::read(&c).ok()?;
                let now = pair.digest();
                (now != seen).then(|| (now, load_certified_key(&c, &pair, &p)))
            })
            .await;
            let (now, loaded) = match changed {
                Ok(Some(c)) => c,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "tls reload task failed");
                    continue;
                }
            };
            match loaded {
                Ok(key) => {
                    *resolver.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
                    seen = now;
                    tracing::info!(cert = %cfg.cert.display(), "tls certificate reloaded");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "tls certificate changed but cannot be loaded; keeping the previous one")
                }
            }
        }
    });
    Ok((tokio_rustls::TlsAcceptor::from(Arc::new(server)), ReloadGuard(task)))
}

/// Stops the reload task when dropped.
pub struct ReloadGuard(tokio::task::JoinHandle<()>);

impl Drop for ReloadGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The DNS names of the connection's verified client certificate, if it presented one.
pub fn peer_names(conn: &rustls::ServerConnection) -> Option<crate::auth::PeerCertNames> {
    let leaf = conn.peer_certificates()?.first()?;
    let cert = webpki::EndEntityCert::try_from(leaf).ok()?;
    Some(crate::auth::PeerCertNames(cert.valid_dns_names().map(str::to_string).collect()))
}
