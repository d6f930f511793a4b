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
//! * Revocation: with `client_crl`, the verifier checks every certificate of the chain (not the
//!   root) against the lists and fails closed: revoked, not covered by any list, or a list past
//!   its next update all refuse the handshake. Lists are reissued often, so the same reload task
//!   hashes the file and, when it changed, builds a new verifier from the new lists and the
//!   roots read at start; the acceptor reaches it through `ClientVerifier`, which only forwards.
//!   A list that fails to parse, is not issued and signed by the CA, or is older than the one
//!   in force (`crl.rs`) keeps the previous verifier, as a bad certificate keeps the previous
//!   key; at start it stops the start, with the lists this node last ran with as the ones in
//!   force (kept in `<data_dir>/crl-floor.json`). The CA itself is read once (its names are
//!   the hints sent to clients).
//! * Only TLS: when TLS is configured the port speaks nothing else; a plain HTTP request fails
//!   the handshake and its connection is closed. Handshakes run in the connection's own task,
//!   bounded by the header read timeout, so a client that opens a connection and stalls holds
//!   nothing but that task.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use crate::config::TlsConfig;
use crate::crl;
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

/// The client-certificate verifier in force, replaced when the revocation lists change.
#[derive(Debug)]
struct ClientVerifier {
    current: RwLock<Arc<dyn ClientCertVerifier>>,
    /// The CA's names, from the verifier built at start: the roots never change.
    hints: Vec<DistinguishedName>,
}

impl ClientVerifier {
    fn get(&self) -> Arc<dyn ClientCertVerifier> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.get().offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.get().client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.get().verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.get().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.get().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.get().supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.get().requires_raw_public_keys()
    }
}

/// The lists in force that a file's lists are checked against: the running node's (a reload),
/// or those it last ran with, kept in the floor file (a start).
#[derive(Clone, Copy)]
enum CheckedAgainst<'a> {
    Running(&'a crl::InForce),
    LastRun(&'a crl::InForce, &'a Path),
}

impl<'a> CheckedAgainst<'a> {
    fn lists(self) -> &'a crl::InForce {
        match self {
            CheckedAgainst::Running(l) | CheckedAgainst::LastRun(l, _) => l,
        }
    }
}

/// The revocation lists in `pem` (the file's bytes, read from `path`), checked against the
/// CA's certificates and the lists in force, if any (`crl.rs`).
fn read_lists(
    path: &Path,
    pem: &[u8],
    ca: &[CertificateDer<'_>],
    in_force: Option<CheckedAgainst<'_>>,
    provider: &CryptoProvider,
) -> Result<(Vec<CertificateRevocationListDer<'static>>, crl::InForce), ServiceError> {
    let lists = CertificateRevocationListDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_error(format!("cannot read revocation lists from {}: {e}", path.display())))?;
    if lists.is_empty() {
        return Err(tls_error(format!("{} holds no revocation list (PEM \"X509 CRL\")", path.display())));
    }
    let fresh = crl::check(&lists, ca, in_force.map(CheckedAgainst::lists), &provider.signature_verification_algorithms)
        .map_err(|e| match (e, in_force) {
            (crl::Refused::Older(why), Some(CheckedAgainst::LastRun(_, floor))) => tls_error(format!(
                "{}: {why}; the list in force is the one this node last ran with, kept in {}: remove that file to go back on purpose",
                path.display(),
                floor.display()
            )),
            (e, _) => tls_error(format!("{}: {e}", path.display())),
        })?;
    Ok((lists, fresh))
}

/// The client CA's certificates, and the roots made of them: what a reload of the lists is
/// built from and checked against.
struct ClientTrust {
    verifier: Arc<ClientVerifier>,
    roots: Arc<RootCertStore>,
    ca: Arc<Vec<CertificateDer<'static>>>,
}

/// A webpki verifier for the CA's `roots` and, if `client_crl` is set, the lists in `pem`
/// (checked by `read_lists`), with the lists' freshness.
fn verifier_for(
    cfg: &TlsConfig,
    roots: &Arc<RootCertStore>,
    ca: &[CertificateDer<'_>],
    pem: Option<&[u8]>,
    in_force: Option<CheckedAgainst<'_>>,
    provider: &Arc<CryptoProvider>,
) -> Result<(Arc<dyn ClientCertVerifier>, crl::InForce), ServiceError> {
    let mut b = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone());
    if !cfg.client_cert_required {
        b = b.allow_unauthenticated();
    }
    let mut fresh = crl::InForce::new();
    if let (Some(path), Some(pem)) = (&cfg.client_crl, pem) {
        let (lists, checked) = read_lists(path, pem, ca, in_force, provider)?;
        b = b.with_crls(lists).enforce_revocation_expiration();
        fresh = checked;
    }
    let verifier = b.build().map_err(|e| match &cfg.client_crl {
        Some(p) => tls_error(format!("client verifier with {}: {e}", p.display())),
        None => tls_error(e.to_string()),
    })?;
    Ok((verifier, fresh))
}

fn tls_error(what: String) -> ServiceError {
    ServiceError::Startup(format!("tls: {what}"))
}

/// The files that are reloaded, as read once: hashed to see a change, and parsed from these
/// same bytes, so what is served is exactly what was compared.
struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
    crl: Option<Vec<u8>>,
}

/// What a reload compares: the certificate with its key, and the revocation lists.
#[derive(Clone, Copy, PartialEq)]
struct Seen {
    pair: blake3::Hash,
    crl: blake3::Hash,
}

fn read_file(path: &Path) -> Result<Vec<u8>, ServiceError> {
    crate::config::read_operator_file(path).map_err(|e| tls_error(format!("cannot read {}: {e}", path.display())))
}

impl Files {
    fn read(cfg: &TlsConfig) -> Result<Files, ServiceError> {
        let crl = cfg.client_crl.as_deref().map(read_file).transpose()?;
        Ok(Files { cert: read_file(&cfg.cert)?, key: read_file(&cfg.key)?, crl })
    }

    fn seen(&self) -> Seen {
        let mut h = blake3::Hasher::new();
        for bytes in [&self.cert, &self.key] {
            h.update(&(bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        }
        Seen { pair: h.finalize(), crl: blake3::hash(self.crl.as_deref().unwrap_or_default()) }
    }
}

fn load_certified_key(cfg: &TlsConfig, pair: &Files, provider: &CryptoProvider) -> Result<CertifiedKey, ServiceError> {
    let certs = parse_certs(&cfg.cert, &pair.cert)?;
    let key = PrivateKeyDer::from_pem_slice(&pair.key)
        .map_err(|e| tls_error(format!("cannot read a private key from {}: {e}", cfg.key.display())))?;
    CertifiedKey::from_der(certs, key, provider).map_err(|e| {
        tls_error(format!("{} and {} are not a certificate and its key: {e}", cfg.cert.display(), cfg.key.display()))
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, ServiceError> {
    parse_certs(path, &read_file(path)?)
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

/// The acceptor for `cfg`, and a task that reloads its certificate and revocation lists while
/// the returned guard lives. `floor` is the file that keeps the lists in force across restarts
/// (`crl.rs`): read here, and written only with `client_crl`, once `ReloadGuard::own_floor`
/// says this node owns its data directory.
pub fn acceptor(cfg: &TlsConfig, floor: &Path) -> Result<(tokio_rustls::TlsAcceptor, ReloadGuard), ServiceError> {
    let floor = Arc::new(crl::Floor::new(floor.to_path_buf()));
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let files = Files::read(cfg)?;
    let first_seen = files.seen();
    let resolver = Arc::new(Reloading { current: RwLock::new(Arc::new(load_certified_key(cfg, &files, &provider)?)) });
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error(e.to_string()))?;
    let (builder, clients, first_lists) = match &cfg.client_ca {
        None => (builder.with_no_client_auth(), None, crl::InForce::new()),
        Some(ca) => {
            let ca_certs = read_certs(ca)?;
            let mut roots = RootCertStore::empty();
            for c in &ca_certs {
                roots.add(c.clone()).map_err(|e| tls_error(format!("{}: {e}", ca.display())))?;
            }
            let roots = Arc::new(roots);
            let last_run = match cfg.client_crl {
                Some(_) => crl::read_floor(floor.path()).map_err(tls_error)?,
                None => None,
            };
            let in_force = last_run.as_ref().map(|l| CheckedAgainst::LastRun(l, floor.path()));
            let (first, lists) = verifier_for(cfg, &roots, &ca_certs, files.crl.as_deref(), in_force, &provider)?;
            if cfg.client_crl.is_some() && last_run.as_ref() != Some(&lists) {
                floor.stage(lists.clone());
            }
            let verifier =
                Arc::new(ClientVerifier { hints: first.root_hint_subjects().to_vec(), current: RwLock::new(first) });
            let trust = ClientTrust { verifier: verifier.clone(), roots, ca: Arc::new(ca_certs) };
            (builder.with_client_cert_verifier(verifier), Some(trust), lists)
        }
    };
    drop(files);
    let mut server = builder.with_cert_resolver(resolver.clone());
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    if clients.is_some() {
        // A resumed session skips the client verifier: it would let a certificate revoked (or
        // refused by a newer verifier) since its first handshake keep connecting.
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
    }

    let (cfg, every, task_floor) = (cfg.clone(), Duration::from_secs(cfg.reload_s), floor.clone());
    let task = tokio::spawn(async move {
        let mut seen = first_seen;
        let mut in_force = first_lists;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // A write that failed (or had not ended) at an earlier tick.
            task_floor.keep(every).await;
            let (c, p, was, lists_now) = (cfg.clone(), provider.clone(), seen, in_force.clone());
            let trust = clients.as_ref().map(|t| (t.roots.clone(), t.ca.clone()));
            // None: unchanged, or unreadable for now (a renewal between its renames).
            let changed = tokio::task::spawn_blocking(move || {
                let files = match Files::read(&c) {
                    Ok(f) => f,
                    Err(e) => {
                        tracing::warn!(error = %e, "tls files unreadable; keeping the ones in force");
                        return None;
                    }
                };
                let now = files.seen();
                let key = (now.pair != was.pair).then(|| load_certified_key(&c, &files, &p));
                let verifier = trust.filter(|_| now.crl != was.crl).map(|(roots, ca)| {
                    verifier_for(&c, &roots, &ca, files.crl.as_deref(), Some(CheckedAgainst::Running(&lists_now)), &p)
                });
                (now != was).then_some((now, key, verifier))
            })
            .await;
            let (now, key, verifier) = match changed {
                Ok(Some(c)) => c,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "tls reload task failed");
                    continue;
                }
            };
            match key {
                Some(Ok(key)) => {
                    *resolver.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
                    seen.pair = now.pair;
                    tracing::info!(cert = %cfg.cert.display(), "tls certificate reloaded");
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "tls certificate changed but cannot be loaded; keeping the previous one")
                }
                None => {}
            }
            match (verifier, &clients) {
                (Some(Ok((v, lists))), Some(trust)) => {
                    // On disk before in force: a crash between leaves the floor at the file's
                    // newer lists. A write that fails, or has not ended within a tick, does not
                    // hold the newer lists back, so until one lands the floor lags what is
                    // enforced, and a restart in that window would take a list between the two.
                    if cfg.client_crl.is_some() {
                        task_floor.stage(lists.clone());
                        task_floor.keep(every).await;
                    }
                    *trust.verifier.current.write().unwrap_or_else(|e| e.into_inner()) = v;
                    in_force = lists;
                    seen.crl = now.crl;
                    tracing::info!(crl = ?cfg.client_crl, "client certificate revocation lists reloaded");
                }
                (Some(Err(e)), _) => {
                    tracing::warn!(error = %e, "revocation lists changed but cannot be loaded; keeping the previous ones")
                }
                _ => {}
            }
        }
    });
    Ok((tokio_rustls::TlsAcceptor::from(Arc::new(server)), ReloadGuard { task, floor }))
}

/// Logs a failed handshake: at warn, at most every ten seconds, when the client's certificate
/// was refused (revoked, expired lists, another CA: an operator needs to see a lock-out);
/// otherwise at debug (scanners, clients that hang up).
pub fn log_handshake_failure(e: &std::io::Error) {
    static LAST_WARN_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let refused = matches!(
        e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented)
    );
    let now = crate::coordinator::now_unix_ms();
    let last = LAST_WARN_MS.load(std::sync::atomic::Ordering::Relaxed);
    if refused
        && now.saturating_sub(last) >= 10_000
        && LAST_WARN_MS
            .compare_exchange(last, now, std::sync::atomic::Ordering::Relaxed, std::sync::atomic::Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(error = %e, "tls handshake refused a client certificate (further ones within 10 s at debug)");
    } else {
        tracing::debug!(error = %e, "tls handshake failed");
    }
}

/// Stops the reload task when dropped.
pub struct ReloadGuard {
    task: tokio::task::JoinHandle<()>,
    floor: Arc<crl::Floor>,
}

impl ReloadGuard {
    /// This node owns its data directory (its index is open): the lists in force are written
    /// to the floor file now, and after every reload from here on.
    pub async fn own_floor(&self) -> Result<(), ServiceError> {
        let floor = self.floor.clone();
        tokio::task::spawn_blocking(move || floor.own())
            .await
            .map_err(crate::error::join_error)?
            .map_err(|e| tls_error(format!("cannot keep the lists in force in {}: {e}", self.floor.path().display())))
    }
}

impl Drop for ReloadGuard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The DNS names of the connection's verified client certificate, if it presented one.
pub fn peer_names(conn: &rustls::ServerConnection) -> Option<crate::auth::PeerCertNames> {
    let leaf = conn.peer_certificates()?.first()?;
    let cert = webpki::EndEntityCert::try_from(leaf).ok()?;
    Some(crate::auth::PeerCertNames(cert.valid_dns_names().map(str::to_string).collect()))
}
