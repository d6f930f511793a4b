//! Which revocation lists ckptd installs (`tls.client_crl`): each must be issued and signed by
//! a certificate of `client_ca`, and a reload never installs a list older than the one in
//! force for its issuer.
//!
//! Design note.
//! * Why: webpki checks a list's signature only when a certificate of its issuer connects, so a
//!   list from another CA, or a damaged one, was installed and then refused every client (fail
//!   closed, but a lock-out). And a list that parses but is older than the one in force (a
//!   restored backup, a sync from a stale mirror) was installed too, and un-revoked what the
//!   newer list revoked. Both are now refused when the file is read: at start-up ckptd does not
//!   start; on a reload the lists in force stay, as for a list that does not parse.
//! * Older: RFC 5280's CRL number (5.2.3) is monotonic per issuer; where either list lacks
//!   one, `thisUpdate` decides. An issuer's newest list in the file counts. A number or a
//!   `thisUpdate` equal to the one in force is the same list, or a reissue of it, and is taken.
//! * Not kept across restarts: what is in force lives in the reload task. A node started on an
//!   older list than it last ran with cannot tell; the issuer and signature checks still hold.
//! * Parsing is x509-parser's. Signatures are checked with the algorithms of rustls's crypto
//!   provider, matched by their DER algorithm identifiers as webpki matches them, so a list
//!   passes here exactly when webpki could verify it; webpki still does the revocation checks.

use std::collections::BTreeMap;

use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};
use x509_parser::der_parser::asn1_rs::ToDer;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;
use x509_parser::x509::{AlgorithmIdentifier, SubjectPublicKeyInfo};

/// How new an issuer's list is: its CRL number (big-endian, no leading zeros) and its
/// `thisUpdate` (Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
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

    fn newer(self, other: Freshness) -> Freshness {
        if other.older_than(&self) {
            self
        } else {
            other
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

/// Checks `lists` against the certificates of `client_ca` and, on a reload, against the lists
/// in force. Returns what the lists say of their freshness, to be in force once they are.
pub(crate) fn check(
    lists: &[CertificateRevocationListDer<'_>],
    ca: &[CertificateDer<'_>],
    in_force: Option<&InForce>,
    algs: &WebPkiSupportedAlgorithms,
) -> Result<InForce, String> {
    let ca: Vec<X509Certificate<'_>> = ca
        .iter()
        .map(|c| X509Certificate::from_der(c).map(|(_, c)| c).map_err(|e| format!("client_ca: {e}")))
        .collect::<Result<_, _>>()?;
    let mut found = InForce::new();
    for (i, der) in lists.iter().enumerate() {
        let nth = i + 1;
        let (_, list) = CertificateRevocationList::from_der(der)
            .map_err(|e| format!("revocation list {nth} does not parse: {e}"))?;
        let issuer = list.issuer();
        let Some(signer) = ca.iter().find(|c| c.subject().as_raw() == issuer.as_raw()) else {
            return Err(format!(
                "revocation list {nth} is issued by \"{issuer}\", which is not a certificate of client_ca"
            ));
        };
        verify_signature(&list, signer.public_key(), algs).map_err(|e| {
            format!("revocation list {nth}'s signature does not verify with the key of \"{issuer}\": {e}")
        })?;
        let fresh = Freshness {
            number: list.crl_number().map(|n| n.to_bytes_be()).map(|mut b| {
                let zeros = b.iter().take_while(|x| **x == 0).count();
                b.drain(..zeros);
                b
            }),
            this_update: list.last_update().timestamp(),
        };
        let key = issuer.as_raw().to_vec();
        let fresh = match found.remove(&key) {
            Some(other) => fresh.newer(other),
            None => fresh,
        };
        found.insert(key, fresh);
    }
    if let Some(in_force) = in_force {
        for (issuer, fresh) in &found {
            if let Some(current) = in_force.get(issuer).filter(|c| fresh.older_than(c)) {
                let name = x509_parser::x509::X509Name::from_der(issuer)
                    .map(|(_, n)| n.to_string())
                    .unwrap_or_else(|_| "?".into());
                return Err(format!(
                    "the revocation list of \"{name}\" ({}) is older than the one in force ({}): it would un-revoke what the newer one revoked",
                    fresh.describe(),
                    current.describe()
                ));
            }
        }
    }
    Ok(found)
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
        assert_eq!(at(Some(&[3]), 1).newer(at(Some(&[4]), 0)), at(Some(&[4]), 0));
        assert_eq!(
            at(Some(&[1; 20]), 0).describe(),
            "number 0x0101010101010101010101010101010101010101, issued at 0 (Unix s)"
        );
        assert_eq!(at(Some(&[1, 0]), 5).describe(), "number 256, issued at 5 (Unix s)");
    }
}
