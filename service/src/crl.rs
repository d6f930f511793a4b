//! Which revocation lists ckptd installs (`tls.client_crl`): each must be issued and signed by
//! a certificate of `client_ca`, and a reload never installs a list older than the one in
//! force for its issuer.
//!
//! Design note.
//! * Why: webpki checks a list's signature only when a certificate of its issuer connects, so a
//!   list signed by another key, or a damaged one, was installed and then refused every client
//!   (fail closed, but a lock-out). And a list that parses but is older than the one in force (a
//!   restored backup, a sync from a stale mirror) was installed too, and un-revoked what the
//!   newer list revoked. Both are now refused when the file is read: at start-up ckptd does not
//!   start; on a reload the lists in force stay, as for a list that does not parse.
//! * Signatures are checked here for issuers that are certificates of `client_ca` (any of them
//!   under the issuer's name: a CA rolling its key has two). An intermediate CA of the clients'
//!   chains is not in that file; its list is taken on its freshness, and webpki checks its
//!   signature when a certificate it issued connects.
//! * Older: RFC 5280's CRL number (5.2.3) is monotonic per issuer; where either list lacks
//!   one, `thisUpdate` decides. A number or a `thisUpdate` equal to the one in force is the
//!   same list, or a reissue of it, and is taken. webpki uses the first list of an issuer it
//!   finds, so a file with two lists of one issuer is refused (the older could be first). The
//!   floor of an issuer the file no longer holds is kept, so leaving it out of one reload does
//!   not let an old list of it in at the next.
//! * Kept across restarts: what is in force is written (durably) to `crl-floor.json` in the
//!   data directory once the node owns it (its index open) and after every reload, a failed
//!   write tried again every reload tick (`Floor`); a start checks the file's lists against it
//!   as a reload does. A node restarted on a stale copy (a rebuilt image, a mirror behind) does
//!   not start, and its error names the floor file: removing that file is how an operator goes
//!   back on purpose (a CA re-created with its numbers starting again). Only an older list
//!   gets that hint; any other refusal is not the floor's. A config without `client_crl`
//!   leaves the file as it is, and it applies again when `client_crl` comes back.
//! * Parsing is x509-parser's. Signatures are checked with the algorithms of rustls's crypto
//!   provider, matched by their DER algorithm identifiers as webpki matches them, so a list
//!   passes here exactly when webpki could verify it; webpki still does the revocation checks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};
use x509_parser::der_parser::asn1_rs::ToDer;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;
use x509_parser::x509::{AlgorithmIdentifier, SubjectPublicKeyInfo};

/// How new an issuer's list is: its CRL number (big-endian, no leading zeros) and its
/// `thisUpdate` (Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Freshness {
    number: Option<Vec<u8>>,
    this_update: i64,
}

impl Freshness {
    /// Whether `self` is older than `other`, the list of the same issuer in force.
    fn older_than(&self, other: &Freshness) -> bool {
        match (&self.number, &other.number) {
            (Some(a), Some(b)) => (a.len(), a) < (b.len(), b),
            _ => self.this_update < other.this_update,
        }
    }

    fn describe(&self) -> String {
        let number = match &self.number {
            Some(n) if n.len() <= 16 => {
                let mut be = [0u8; 16];
                be[16 - n.len()..].copy_from_slice(n);
                format!("number {}", u128::from_be_bytes(be))
            }
            Some(n) => format!("number 0x{}", n.iter().map(|b| format!("{b:02x}")).collect::<String>()),
            None => "no number".into(),
        };
        format!("{number}, issued at {} (Unix s)", self.this_update)
    }
}

/// The lists in force, by issuer (the DER of its name).
pub(crate) type InForce = BTreeMap<Vec<u8>, Freshness>;

/// Why a file's lists are not installed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refused {
    /// A list older than the one in force for its issuer: the only refusal that a floor an
    /// operator means to lower can cause.
    #[error("{0}")]
    Older(String),
    /// A list that does not parse, a signature that does not verify, two lists of one issuer.
    #[error("{0}")]
    Invalid(String),
}

/// The floor file's contents: one entry per issuer.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FloorFile {
    format: u32,
    issuers: Vec<FloorEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FloorEntry {
    /// The issuer's name as text, for a reader of the file; not read back.
    name: String,
    /// The DER of the issuer's name: the key.
    issuer: Vec<u8>,
    #[serde(flatten)]
    fresh: Freshness,
}

const FLOOR_FORMAT: u32 = 1;

/// The lists in force when this node last ran, from the floor file at `path`; `None` when
/// there is none (a first start, or an operator removed it). A file that cannot be read or
/// parsed is an error, never taken as "no floor": that would let an old list in.
pub(crate) fn read_floor(path: &Path) -> Result<Option<InForce>, String> {
    let bytes = match crate::config::read_operator_file(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let file: FloorFile = serde_json::from_slice(&bytes).map_err(|e| {
        format!("{} does not parse ({e}); remove it to take the lists in the file as they are", path.display())
    })?;
    if file.format != FLOOR_FORMAT {
        return Err(format!("{} has format {}, this ckptd reads {FLOOR_FORMAT}", path.display(), file.format));
    }
    Ok(Some(file.issuers.into_iter().map(|e| (e.issuer, e.fresh)).collect()))
}

/// Writes `in_force` to the floor file at `path`, durably (a power cut leaves the old file or
/// the new one).
pub(crate) fn write_floor(path: &Path, in_force: &InForce) -> Result<(), crate::durable::DurableError> {
    let issuers = in_force
        .iter()
        .map(|(issuer, fresh)| FloorEntry { name: issuer_name(issuer), issuer: issuer.clone(), fresh: fresh.clone() })
        .collect();
    let bytes = serde_json::to_vec_pretty(&FloorFile { format: FLOOR_FORMAT, issuers })
        .expect("a floor of byte strings and integers serialises");
    crate::durable::write_new(path, |f| std::io::Write::write_all(f, &bytes))
}

/// The lists in force as kept in the floor file. Nothing is written until the node owns its
/// data directory (`own`, once its index is open): a start that fails before that, or a second
/// ckptd started on the same directory, writes nothing. Then the lists are written at once,
/// and after each reload; a write that fails stays pending and is tried again (`flush`, every
/// reload tick) until one succeeds. The reload task waits for a write at most a tick (`keep`):
/// a write stuck on a hung disk is left to finish, no second one starts beside it, and the
/// task goes on renewing certificates.
pub(crate) struct Floor {
    path: PathBuf,
    owned: AtomicBool,
    /// A `keep` write is running (it may have outlived its wait).
    in_flight: AtomicBool,
    /// Lists in force that the file does not hold yet (short holds only).
    pending: Mutex<Option<InForce>>,
    /// Held over a whole write, so two writes never cross and an older one never lands last.
    writing: Mutex<()>,
}

impl Floor {
    pub(crate) fn new(path: PathBuf) -> Floor {
        Floor {
            path,
            owned: AtomicBool::new(false),
            in_flight: AtomicBool::new(false),
            pending: Mutex::new(None),
            writing: Mutex::new(()),
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// `lists` are in force now.
    pub(crate) fn stage(&self, lists: InForce) {
        *self.pending.lock().unwrap_or_else(|e| e.into_inner()) = Some(lists);
    }

    pub(crate) fn is_pending(&self) -> bool {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// The node owns its data directory: writes may start. Blocking (see `flush`).
    pub(crate) fn own(&self) -> Result<(), crate::durable::DurableError> {
        self.owned.store(true, Ordering::Release);
        self.flush()
    }

    /// Writes the pending lists, if the node owns its directory. Blocking: a write and fsyncs.
    pub(crate) fn flush(&self) -> Result<(), crate::durable::DurableError> {
        if !self.owned.load(Ordering::Acquire) {
            return Ok(());
        }
        let _one = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        let Some(lists) = self.pending.lock().unwrap_or_else(|e| e.into_inner()).clone() else { return Ok(()) };
        write_floor(&self.path, &lists)?;
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.as_ref() == Some(&lists) {
            *pending = None;
        }
        Ok(())
    }
}

/// What one `Floor::keep` did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Kept {
    /// Nothing was pending, or the pending lists are on disk now.
    Written,
    /// The write failed; the lists stay pending.
    Failed,
    /// The write did not end within the wait (it goes on, and the lists stay pending until it
    /// lands), or one started earlier is still running.
    Stuck,
}

impl Floor {
    /// Writes the pending lists off the runtime, waiting at most `wait`. Failures are logged
    /// here; the lists stay pending for the next call.
    pub(crate) async fn keep(self: &std::sync::Arc<Self>, wait: std::time::Duration) -> Kept {
        if !self.is_pending() {
            return Kept::Written;
        }
        if self.in_flight.swap(true, Ordering::AcqRel) {
            tracing::error!(
                path = %self.path.display(),
                "the revocation lists' floor write started earlier has not ended (a stuck disk?); not starting another"
            );
            return Kept::Stuck;
        }
        let floor = self.clone();
        let write = tokio::task::spawn_blocking(move || {
            // Cleared however the write ends, a panic included: a flag left set would stop
            // every later write.
            struct Clear<'a>(&'a AtomicBool);
            impl Drop for Clear<'_> {
                fn drop(&mut self) {
                    self.0.store(false, Ordering::Release);
                }
            }
            let _clear = Clear(&floor.in_flight);
            floor.flush()
        });
        match tokio::time::timeout(wait, write).await {
            Ok(Ok(Ok(()))) => Kept::Written,
            Ok(Ok(Err(e))) => {
                tracing::error!(
                    error = %e,
                    "cannot keep the revocation lists in force across restarts; trying again at the next reload tick"
                );
                Kept::Failed
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "the floor's write task failed; trying again at the next reload tick");
                Kept::Failed
            }
            Err(_) => {
                tracing::error!(
                    path = %self.path.display(),
                    wait_s = wait.as_secs_f64(),
                    "the revocation lists' floor write has not ended (a stuck disk?); reloads go on without it"
                );
                Kept::Stuck
            }
        }
    }
}

fn issuer_name(der: &[u8]) -> String {
    x509_parser::x509::X509Name::from_der(der).map(|(_, n)| n.to_string()).unwrap_or_else(|_| "?".into())
}

/// Checks `lists` against the certificates of `client_ca` and, on a reload, against the lists
/// in force. Returns the lists in force once these are: theirs, and the earlier ones of issuers
/// the file no longer holds (so leaving an issuer out of one reload cannot clear its floor).
pub(crate) fn check(
    lists: &[CertificateRevocationListDer<'_>],
    ca: &[CertificateDer<'_>],
    in_force: Option<&InForce>,
    algs: &WebPkiSupportedAlgorithms,
) -> Result<InForce, Refused> {
    let ca: Vec<X509Certificate<'_>> = ca
        .iter()
        .map(|c| X509Certificate::from_der(c).map(|(_, c)| c).map_err(|e| Refused::Invalid(format!("client_ca: {e}"))))
        .collect::<Result<_, _>>()?;
    let mut found = InForce::new();
    for (i, der) in lists.iter().enumerate() {
        let nth = i + 1;
        let (_, list) = CertificateRevocationList::from_der(der)
            .map_err(|e| Refused::Invalid(format!("revocation list {nth} does not parse: {e}")))?;
        let issuer = list.issuer();
        // Every certificate of client_ca under the issuer's name (a CA rolling its key has two).
        // An issuer that is none of them is an intermediate of the clients' chains: webpki
        // checks its list's signature when a certificate it issued connects.
        let signers: Vec<&X509Certificate<'_>> =
            ca.iter().filter(|c| c.subject().as_raw() == issuer.as_raw()).collect();
        if !signers.is_empty() {
            let tried: Vec<Result<(), String>> =
                signers.iter().map(|c| verify_signature(&list, c.public_key(), algs)).collect();
            if let Some(why) =
                tried.iter().all(Result::is_err).then(|| tried.into_iter().find_map(Result::err)).flatten()
            {
                return Err(Refused::Invalid(format!(
                    "revocation list {nth}'s signature does not verify with the key of \"{issuer}\": {why}"
                )));
            }
        }
        let fresh = Freshness {
            number: list.crl_number().map(|n| n.to_bytes_be()).map(|mut b| {
                let zeros = b.iter().take_while(|x| **x == 0).count();
                b.drain(..zeros);
                b
            }),
            this_update: list.last_update().timestamp(),
        };
        // webpki uses the first list of an issuer it finds, so an older list ahead of a newer
        // one would be the one in force: one list per issuer.
        if found.insert(issuer.as_raw().to_vec(), fresh).is_some() {
            return Err(Refused::Invalid(format!(
                "the file holds more than one revocation list of \"{issuer}\" (list {nth} is another); keep only the newest"
            )));
        }
    }
    let Some(in_force) = in_force else { return Ok(found) };
    for (issuer, fresh) in &found {
        if let Some(current) = in_force.get(issuer).filter(|c| fresh.older_than(c)) {
            return Err(Refused::Older(format!(
                "the revocation list of \"{}\" ({}) is older than the one in force ({}): it would un-revoke what the newer one revoked",
                issuer_name(issuer),
                fresh.describe(),
                current.describe()
            )));
        }
    }
    let mut merged = in_force.clone();
    merged.extend(found);
    Ok(merged)
}

/// The DER contents of an AlgorithmIdentifier SEQUENCE, the form rustls's algorithms name
/// themselves by.
fn algorithm_id(a: &AlgorithmIdentifier<'_>) -> Result<Vec<u8>, String> {
    let mut out = a.algorithm.to_der_vec().map_err(|e| e.to_string())?;
    if let Some(p) = &a.parameters {
        out.extend(p.to_der_vec().map_err(|e| e.to_string())?);
    }
    Ok(out)
}

fn verify_signature(
    list: &CertificateRevocationList<'_>,
    key: &SubjectPublicKeyInfo<'_>,
    algs: &WebPkiSupportedAlgorithms,
) -> Result<(), String> {
    let (sig_id, key_id) = (algorithm_id(&list.signature_algorithm)?, algorithm_id(&key.algorithm)?);
    let mut candidates = algs
        .all
        .iter()
        .filter(|a| {
            a.signature_alg_id().as_ref() == sig_id.as_slice() && a.public_key_alg_id().as_ref() == key_id.as_slice()
        })
        .peekable();
    if candidates.peek().is_none() {
        return Err(format!(
            "its signature algorithm ({}) is not one rustls verifies",
            list.signature_algorithm.algorithm
        ));
    }
    let (tbs, signature) = (list.tbs_cert_list.as_ref(), list.signature_value.data.as_ref());
    if candidates.any(|a| a.verify_signature(&key.subject_public_key.data, tbs, signature).is_ok()) {
        Ok(())
    } else {
        Err("the signature is bad".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType, IsCa, Issuer, KeyPair};

    /// A CA named `name` with a new key: its certificate and what signs for it.
    fn ca(name: &str) -> (CertificateDer<'static>, Issuer<'static, KeyPair>) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let cert = p.self_signed(&key).unwrap().der().clone();
        (cert, Issuer::new(p, key))
    }

    fn list(by: &Issuer<'static, KeyPair>, number: u64) -> CertificateRevocationListDer<'static> {
        let params = CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2025, 1, 1),
            next_update: rcgen::date_time_ymd(2099, 1, 1),
            crl_number: rcgen::SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: Vec::new(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        params.signed_by(by).unwrap().der().clone()
    }

    fn algs() -> WebPkiSupportedAlgorithms {
        rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms
    }

    #[test]
    fn lists_are_checked_against_the_ca_and_never_go_back() {
        let ((a_cert, a), (b_cert, b)) = (ca("ca a"), ca("ca b"));
        let cas = [a_cert.clone(), b_cert];
        let first = check(&[list(&a, 5), list(&b, 3)], &cas, None, &algs()).unwrap();
        assert_eq!(first.len(), 2);
        // A reload without b's list keeps b's floor: an old list of b is refused later.
        let second = check(&[list(&a, 6)], &cas, Some(&first), &algs()).unwrap();
        assert_eq!(second.len(), 2, "b's floor was dropped");
        let e = check(&[list(&a, 6), list(&b, 1)], &cas, Some(&second), &algs()).unwrap_err();
        assert!(matches!(e, Refused::Older(_)), "{e:?}");
        let e = e.to_string();
        assert!(
            e.contains(
                "\"CN=ca b\" (number 1, issued at 1735689600 (Unix s)) is older than the one in force (number 3"
            ),
            "{e}"
        );
        assert!(check(&[list(&a, 4)], &cas, Some(&second), &algs()).unwrap_err().to_string().contains("older"));
        // Two lists of one issuer: webpki would use whichever comes first.
        let e = check(&[list(&a, 7), list(&a, 8)], &cas, Some(&second), &algs()).unwrap_err();
        assert!(matches!(e, Refused::Invalid(_)), "{e:?}");
        let e = e.to_string();
        assert!(e.contains("more than one revocation list of \"CN=ca a\""), "{e}");
    }

    #[test]
    fn signatures_are_checked_with_every_key_of_the_issuer_and_intermediates_are_left_to_webpki() {
        let (old_cert, _old) = ca("ca");
        let (new_cert, new) = ca("ca");
        // A key rollover: two certificates under one name; the list verifies with the second.
        check(&[list(&new, 1)], &[old_cert.clone(), new_cert], None, &algs()).unwrap();
        // Under the CA's name but signed by another key.
        let e = check(&[list(&new, 1)], std::slice::from_ref(&old_cert), None, &algs()).unwrap_err().to_string();
        assert!(e.contains("signature does not verify with the key of \"CN=ca\""), "{e}");
        // An issuer that is not in client_ca (an intermediate): taken on its freshness.
        let (_, intermediate) = ca("intermediate");
        let lists = check(&[list(&intermediate, 2)], &[old_cert], None, &algs()).unwrap();
        assert_eq!(lists.len(), 1);
    }

    #[test]
    fn the_floor_file_keeps_what_is_in_force_and_a_damaged_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state").join("crl-floor.json");
        assert_eq!(read_floor(&path).unwrap(), None, "no file is no floor");
        let ((a_cert, a), (b_cert, b)) = (ca("ca a"), ca("ca b"));
        let in_force = check(&[list(&a, 5), list(&b, 300)], &[a_cert.clone(), b_cert.clone()], None, &algs()).unwrap();
        write_floor(&path, &in_force).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"CN=ca b\""), "names are written for a reader: {text}");
        let back = read_floor(&path).unwrap().unwrap();
        assert_eq!(back, in_force);
        // Read back, it refuses an older list as the in-memory one does.
        let e = check(&[list(&b, 299)], &[a_cert, b_cert], Some(&back), &algs()).unwrap_err().to_string();
        assert!(e.contains("(number 299") && e.contains("in force (number 300"), "{e}");
        // A damaged file is never taken as no floor.
        std::fs::write(&path, &text[..text.len() / 2]).unwrap();
        let e = read_floor(&path).unwrap_err();
        assert!(e.contains("does not parse") && e.contains("remove it"), "{e}");
        std::fs::write(&path, text.replace("\"format\": 1", "\"format\": 2")).unwrap();
        assert!(read_floor(&path).unwrap_err().contains("has format 2"));
    }

    #[test]
    fn the_floor_is_written_once_owned_and_a_failed_write_is_tried_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state").join("crl-floor.json");
        let (a_cert, a) = ca("ca a");
        let lists = |n| check(&[list(&a, n)], std::slice::from_ref(&a_cert), None, &algs()).unwrap();
        let floor = Floor::new(path.clone());
        floor.stage(lists(1));
        floor.flush().unwrap();
        assert!(!path.exists() && floor.is_pending(), "written before the node owned its directory");
        // The directory cannot be made (a file is in its place): the write fails and stays.
        std::fs::write(dir.path().join("state"), b"in the way").unwrap();
        assert!(floor.own().is_err());
        floor.stage(lists(2));
        assert!(floor.flush().is_err() && floor.is_pending());
        std::fs::remove_file(dir.path().join("state")).unwrap();
        floor.flush().unwrap();
        assert!(!floor.is_pending());
        assert_eq!(read_floor(&path).unwrap(), Some(lists(2)), "the newest staged lists");
    }

    #[tokio::test]
    async fn a_stuck_floor_write_is_waited_for_a_tick_and_never_doubled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crl-floor.json");
        let (a_cert, a) = ca("ca a");
        let lists = |n| check(&[list(&a, n)], std::slice::from_ref(&a_cert), None, &algs()).unwrap();
        let floor = std::sync::Arc::new(Floor::new(path.clone()));
        floor.own().unwrap();
        floor.stage(lists(1));
        let wait = std::time::Duration::from_millis(200);
        // A write that cannot end: another thread holds the file's write lock, as a hung fsync
        // would, until told to let go.
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let holder = floor.clone();
        let stuck = std::thread::spawn(move || {
            let _held = holder.writing.lock().unwrap();
            held_tx.send(()).unwrap();
            release_rx.recv().ok();
        });
        held_rx.recv().unwrap();
        let bounded = tokio::time::timeout(std::time::Duration::from_secs(5), floor.keep(wait)).await;
        assert_eq!(bounded.expect("keep waited on the stuck write past its wait"), Kept::Stuck);
        assert!(floor.is_pending() && !path.exists());
        // The next tick does not start a second write beside the stuck one.
        let t0 = std::time::Instant::now();
        assert_eq!(floor.keep(wait).await, Kept::Stuck);
        assert!(t0.elapsed() < wait, "it waited on the stuck write again");
        // The disk comes back: the write started first lands, with the newest lists.
        floor.stage(lists(2));
        release_tx.send(()).unwrap();
        stuck.join().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while floor.in_flight.load(Ordering::Acquire) {
            assert!(std::time::Instant::now() < deadline, "the stuck write never ended");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(!floor.is_pending());
        assert_eq!(read_floor(&path).unwrap(), Some(lists(2)));
        assert_eq!(floor.keep(wait).await, Kept::Written);
    }

    fn at(number: Option<&[u8]>, this_update: i64) -> Freshness {
        Freshness { number: number.map(<[u8]>::to_vec), this_update }
    }

    #[test]
    fn numbers_decide_and_times_where_a_number_is_missing() {
        // Numbers compare as integers, whatever their times say.
        assert!(at(Some(&[2]), 500).older_than(&at(Some(&[1, 0]), 100)));
        assert!(!at(Some(&[1, 0]), 100).older_than(&at(Some(&[0xff]), 500)));
        assert!(!at(Some(&[7]), 1).older_than(&at(Some(&[7]), 9)), "the same number is the same list");
        // Without a number on either side, thisUpdate.
        assert!(at(None, 99).older_than(&at(Some(&[9]), 100)));
        assert!(!at(Some(&[1]), 100).older_than(&at(None, 100)));
        assert_eq!(
            at(Some(&[1; 20]), 0).describe(),
            "number 0x0101010101010101010101010101010101010101, issued at 0 (Unix s)"
        );
        assert_eq!(at(Some(&[1, 0]), 5).describe(), "number 256, issued at 5 (Unix s)");
    }
}
