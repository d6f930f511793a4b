//! TLS and mutual TLS against a real ckptd on loopback, with certificates generated here
//! (rcgen): saves over https, plain HTTP refused, client certificates mapped to tenants,
//! certificates from another CA refused, a renewed certificate served without a restart, and
//! revoked client certificates refused, with revocation lists read again when they change and
//! never going back to an older one, across restarts too.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ckpt_client::daemon::{DaemonOptions, LocalDaemon};
use ckpt_client::{Client, ClientOptions, TlsFiles, Token};
use ckpt_tests::*;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SerialNumber,
};

const TOKEN: &str = "tls-test-token-3e1d0c9b8a7f6e5d4c3b2a19";

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn new_ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let pem = p.self_signed(&key).unwrap().pem();
    Ca { issuer: Issuer::new(p, key), pem }
}

/// A leaf for `names`, signed by `ca`: (certificate PEM, key PEM).
fn leaf(ca: &Ca, names: &[&str], usage: ExtendedKeyUsagePurpose) -> (String, String) {
    numbered_leaf(ca, names, usage, None)
}

/// A leaf with a chosen serial number, which a revocation list can name.
fn numbered_leaf(ca: &Ca, names: &[&str], usage: ExtendedKeyUsagePurpose, serial: Option<u64>) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.extended_key_usages = vec![usage];
    p.serial_number = serial.map(SerialNumber::from);
    p.distinguished_name.push(DnType::CommonName, names[0]);
    (p.signed_by(&key, &ca.issuer).unwrap().pem(), key.serialize_pem())
}

/// A revocation list from `ca` naming `revoked` serials, valid over `valid` (years).
fn crl(ca: &Ca, number: u64, revoked: &[u64], valid: (i32, i32)) -> String {
    let params = CertificateRevocationListParams {
        this_update: rcgen::date_time_ymd(valid.0, 1, 1),
        next_update: rcgen::date_time_ymd(valid.1, 1, 1),
        crl_number: SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .iter()
            .map(|&n| RevokedCertParams {
                serial_number: SerialNumber::from(n),
                revocation_time: rcgen::date_time_ymd(valid.0, 1, 1),
                reason_code: None,
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    params.signed_by(&ca.issuer).unwrap().pem().unwrap()
}

/// Replaces `name` in `dir` by a rename, as a deployment tool does.
fn replace(dir: &Path, name: &str, text: &str) {
    let tmp = write(dir, &format!("{name}.new"), text);
    std::fs::rename(tmp, dir.join(name)).unwrap();
}

/// A new CA and a server certificate for localhost from it, written as `ca.pem`, `server.pem`
/// and `server.key` in `dir`.
fn ca_and_server(dir: &Path) -> Ca {
    let ca = new_ca("ckpt test ca");
    let (server_pem, server_key) = leaf(&ca, &["localhost"], ExtendedKeyUsagePurpose::ServerAuth);
    write(dir, "ca.pem", &ca.pem);
    write(dir, "server.pem", &server_pem);
    write(dir, "server.key", &server_key);
    ca
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

async fn start(dir: &Path, tls: &str) -> LocalDaemon {
    start_with(dir, "", tls).await
}

/// As `start`, with `top` as top-level settings of ckptd's config.
async fn start_with(dir: &Path, top: &str, tls: &str) -> LocalDaemon {
    let cfg = format!(
        r#"
{top}
[tls]
cert = "{}"
key = "{}"
client_ca = "{}"
reload_s = 1
{tls}

[[tenants]]
name = "team-a"
token_blake3 = ["{}"]
client_cert_names = ["team-a.clients.test"]
job_prefixes = ["a-"]
"#,
        dir.join("server.pem").display(),
        dir.join("server.key").display(),
        dir.join("ca.pem").display(),
        blake3::hash(TOKEN.as_bytes()).to_hex()
    );
    let path = write(dir, "ckptd.toml", &cfg);
    let mut opts = DaemonOptions::in_dir(ckptd_exe(), dir);
    opts.extra_args = vec!["--config".into(), path.into()];
    start_daemon_with(opts).await
}

fn https(d: &LocalDaemon) -> String {
    d.url().replace("http://127.0.0.1", "https://localhost")
}

fn client(d: &LocalDaemon, token: Option<&str>, tls: TlsFiles) -> Client {
    let opts = ClientOptions {
        chunk_bytes: 64 << 10,
        node_local: false,
        token: token.map(Token::new),
        tls,
        attempts_max: 1,
        retry_unreachable: false,
        ..ClientOptions::default()
    };
    Client::new(&https(d), opts).unwrap()
}

/// The certificate the server presents on a fresh connection, as DER.
async fn served_cert(addr: &str, ca_pem: &str) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

use rustls::pki_types::pem::PemObject;

/// Whether `GET /healthz` over a new connection made with `cfg` gets an HTTP answer. `cfg`
/// keeps TLS sessions between calls, as every client's does, so a later call resumes when the
/// server lets it.
async fn answered(addr: &str, cfg: &Arc<rustls::ClientConfig>) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else { return false };
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let Ok(mut tls) = tokio_rustls::TlsConnector::from(cfg.clone()).connect(name, tcp).await else { return false };
    if tls.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n").await.is_err() {
        return false;
    }
    let mut buf = Vec::new();
    let _ = tls.read_to_end(&mut buf).await;
    buf.starts_with(b"HTTP/1.1 ")
}

/// A client config trusting `ca_pem` and presenting `cert_pem` with `key_pem`.
fn client_config(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes()).map(|c| c.unwrap()).collect();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .unwrap();
    Arc::new(cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_mutual_tls_on_loopback() {
    bounded(Duration::from_secs(180), async {
        let dir = tempfile::tempdir().unwrap();
        let d_path = dir.path();
        let ca = ca_and_server(d_path);
        let (a_pem, a_key) = leaf(&ca, &["team-a.clients.test"], ExtendedKeyUsagePurpose::ClientAuth);
        let (x_pem, x_key) = leaf(&ca, &["stranger.clients.test"], ExtendedKeyUsagePurpose::ClientAuth);
        let other_ca = new_ca("another ca");
        let (o_pem, o_key) = leaf(&other_ca, &["team-a.clients.test"], ExtendedKeyUsagePurpose::ClientAuth);
        let files = |cert: Option<(&str, &str, &str)>| TlsFiles {
            ca: Some(d_path.join("ca.pem")),
            cert: cert.map(|(n, c, _)| write(d_path, &format!("{n}.pem"), c)),
            key: cert.map(|(n, _, k)| write(d_path, &format!("{n}.key"), k)),
        };

        let d = start(d_path, "").await;
        let seed = seed(21);
        let state = vec![rank_tensors(seed, 0, 1, 256 << 10)];

        // A token over TLS: save, then read back every byte verified.
        let c = client(&d, Some(TOKEN), files(None));
        save_step(&c, "a-tls", 1, &state).await.unwrap();
        assert_eq!(c.load_rank("a-tls", 1, 0).await.unwrap().len(), state[0].len());

        // A client certificate of team a, no token: authenticated as team a.
        let by_cert = client(&d, None, files(Some(("a", &a_pem, &a_key))));
        assert_eq!(by_cert.list("a-tls").await.unwrap().committed.len(), 1);
        // A valid certificate mapped to no tenant and no token: 401.
        let stranger = client(&d, None, files(Some(("x", &x_pem, &x_key))));
        let e = stranger.list("a-tls").await.unwrap_err().to_string();
        assert!(e.contains("401"), "{e}");
        // A certificate from another CA: the handshake fails.
        let transport = |r: Result<ckpt_client::client::CheckpointList, ckpt_client::ClientError>| {
            matches!(r, Err(ckpt_client::ClientError::Transport { .. }))
        };
        let foreign = client(&d, Some(TOKEN), files(Some(("o", &o_pem, &o_key))));
        assert!(transport(foreign.list("a-tls").await), "a certificate from another CA was accepted");
        // Without trusting ckptd's CA: refused by the client.
        let untrusting = client(&d, Some(TOKEN), TlsFiles::default());
        assert!(transport(untrusting.list("a-tls").await), "a client trusted an unknown CA");

        // Plain HTTP to the TLS port gets no HTTP answer.
        let plain = Client::new(
            &d.url(),
            ClientOptions {
                token: Some(Token::new(TOKEN)),
                attempts_max: 1,
                retry_unreachable: false,
                ..ClientOptions::default()
            },
        )
        .unwrap();
        let e = plain.list("a-tls").await.unwrap_err();
        assert!(!matches!(e, ckpt_client::ClientError::Api { .. }), "plain HTTP got an HTTP answer: {e}");

        // A renewed certificate is served without a restart.
        let addr = d.url().trim_start_matches("http://").to_string();
        let before = served_cert(&addr, &ca.pem).await;
        let (renewed_pem, renewed_key) = leaf(&ca, &["localhost"], ExtendedKeyUsagePurpose::ServerAuth);
        // Key first, then the certificate, each by rename: a reload between the two sees a
        // mismatched pair and keeps the old one until the next check.
        let tmp = write(d_path, "server.key.new", &renewed_key);
        std::fs::rename(&tmp, d_path.join("server.key")).unwrap();
        let tmp = write(d_path, "server.pem.new", &renewed_pem);
        std::fs::rename(&tmp, d_path.join("server.pem")).unwrap();
        let renewed_der = rustls::pki_types::CertificateDer::from_pem_slice(renewed_pem.as_bytes()).unwrap().to_vec();
        let mut served = before.clone();
        for _ in 0..100 {
            served = served_cert(&addr, &ca.pem).await;
            if served != before {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(served, renewed_der, "the renewed certificate was not served within 10 s");
        // A renewal copied with its old modification times kept (`cp -p`, some secret
        // managers) is seen too: the files' contents are compared, not their times.
        let times = |f: &str| std::fs::metadata(d_path.join(f)).unwrap().modified().unwrap();
        let (cert_time, key_time) = (times("server.pem"), times("server.key"));
        let (third_pem, third_key) = leaf(&ca, &["localhost"], ExtendedKeyUsagePurpose::ServerAuth);
        for (name, text, time) in [("server.key", &third_key, key_time), ("server.pem", &third_pem, cert_time)] {
            let tmp = write(d_path, &format!("{name}.new"), text);
            std::fs::File::options().write(true).open(&tmp).unwrap().set_modified(time).unwrap();
            std::fs::rename(&tmp, d_path.join(name)).unwrap();
        }
        assert_eq!(times("server.pem"), cert_time, "the copy kept its time");
        let third_der = rustls::pki_types::CertificateDer::from_pem_slice(third_pem.as_bytes()).unwrap().to_vec();
        for _ in 0..100 {
            served = served_cert(&addr, &ca.pem).await;
            if served == third_der {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(served, third_der, "a renewal with its old times kept was not served within 10 s");
        // and the service still works over it.
        assert_eq!(c.list("a-tls").await.unwrap().committed.len(), 1);
        drop(d);

        // With client certificates required, a token alone is not enough: no handshake.
        let dir2 = tempfile::tempdir().unwrap();
        for f in ["ca.pem", "server.pem", "server.key"] {
            std::fs::copy(d_path.join(f), dir2.path().join(f)).unwrap();
        }
        let d = start(dir2.path(), "client_cert_required = true").await;
        let e = client(&d, Some(TOKEN), files(None)).list("a-tls").await;
        assert!(transport(e), "a connection without a client certificate was accepted");
        let ok = client(&d, None, files(Some(("a", &a_pem, &a_key))));
        assert!(ok.list("a-tls").await.unwrap().committed.is_empty(), "a fresh store has no checkpoints");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_client_certificates_fail_the_handshake_and_lists_are_read_again() {
    bounded(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().unwrap();
        let d_path = dir.path();
        let ca = ca_and_server(d_path);
        let name = ["team-a.clients.test"];
        let (alice_pem, alice_key) = numbered_leaf(&ca, &name, ExtendedKeyUsagePurpose::ClientAuth, Some(101));
        let (bob_pem, bob_key) = numbered_leaf(&ca, &name, ExtendedKeyUsagePurpose::ClientAuth, Some(102));
        let files = |n: &str, cert: &str, key: &str| TlsFiles {
            ca: Some(d_path.join("ca.pem")),
            cert: Some(write(d_path, &format!("{n}.pem"), cert)),
            key: Some(write(d_path, &format!("{n}.key"), key)),
        };
        write(d_path, "crl.pem", &crl(&ca, 1, &[], (2025, 2099)));
        let crl_line = format!("client_cert_required = true\nclient_crl = \"{}\"", d_path.join("crl.pem").display());
        let d = start(d_path, &crl_line).await;
        // Each call a new client, so a new connection: a refused handshake is what is looked for.
        let refused = |n: &str, cert: &str, key: &str| {
            let c = client(&d, None, files(n, cert, key));
            async move {
                match c.list("a-x").await {
                    Ok(_) => false,
                    Err(ckpt_client::ClientError::Transport { .. }) => true,
                    Err(e) => panic!("neither served nor refused at the handshake: {e}"),
                }
            }
        };
        let alice = || refused("alice", &alice_pem, &alice_key);
        let bob = || refused("bob", &bob_pem, &bob_key);
        // Within 10 s: the file is checked every second.
        async fn within_10s<F: std::future::Future<Output = bool>>(mut f: impl FnMut() -> F) -> bool {
            for _ in 0..100 {
                if f().await {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            false
        }
        assert!(!alice().await && !bob().await, "refused under a list naming nobody");
        // Bob also with a client that keeps its TLS sessions, twice: the second may resume.
        let addr = d.url().trim_start_matches("http://").to_string();
        let bob_sessions = client_config(&ca.pem, &bob_pem, &bob_key);
        assert!(answered(&addr, &bob_sessions).await && answered(&addr, &bob_sessions).await);

        // Bob's certificate is revoked: a new list, read without a restart.
        replace(d_path, "crl.pem", &crl(&ca, 2, &[102], (2025, 2099)));
        assert!(within_10s(bob).await, "a revoked certificate was still accepted\n{}", daemon_log(&d));
        assert!(!alice().await, "alice is not revoked");
        assert!(daemon_log(&d).contains("revocation lists reloaded"), "{}", daemon_log(&d));
        assert!(!answered(&addr, &bob_sessions).await, "a revoked certificate got in by resuming an earlier session");
        assert!(
            daemon_log(&d).contains("tls handshake refused a client certificate"),
            "a refused certificate is logged where an operator sees it\n{}",
            daemon_log(&d)
        );

        // A list that does not parse keeps the previous ones: bob stays out, alice in.
        replace(d_path, "crl.pem", "-----BEGIN X509 CRL-----\nbm90IGEgbGlzdA==\n-----END X509 CRL-----\n");
        let told = || async { daemon_log(&d).contains("revocation lists changed but cannot be loaded") };
        assert!(within_10s(told).await, "{}", daemon_log(&d));
        assert!(bob().await, "a bad list let a revoked certificate in");
        assert!(!alice().await, "a bad list locked alice out");

        // A list past its next update is not trusted: every client certificate fails closed.
        replace(d_path, "crl.pem", &crl(&ca, 3, &[], (2020, 2021)));
        assert!(within_10s(alice).await, "a certificate was accepted on an expired revocation list");
        // and a fresh list lets alice in again: the node was refusing, not gone.
        replace(d_path, "crl.pem", &crl(&ca, 4, &[102], (2025, 2099)));
        assert!(within_10s(|| async { !alice().await }).await, "a fresh list did not let alice back in");

        // An older list that parses (a restored backup: number 1, naming nobody) is not
        // installed: it would un-revoke bob.
        replace(d_path, "crl.pem", &crl(&ca, 1, &[], (2025, 2099)));
        let older = || async { daemon_log(&d).contains("is older than the one in force") };
        assert!(within_10s(older).await, "{}", daemon_log(&d));
        assert!(bob().await, "an older list un-revoked bob");
        // Nor is a list under the CA's name signed by another key: it would lock everyone out.
        let impostor = new_ca("ckpt test ca");
        replace(d_path, "crl.pem", &crl(&impostor, 9, &[], (2025, 2099)));
        let forged = || async { daemon_log(&d).contains("signature does not verify") };
        assert!(within_10s(forged).await, "{}", daemon_log(&d));
        assert!(!alice().await, "a forged list locked alice out");
        assert!(bob().await, "a forged list un-revoked bob");
        // A newer list is taken.
        replace(d_path, "crl.pem", &crl(&ca, 5, &[101, 102], (2025, 2099)));
        assert!(within_10s(alice).await, "the newer list naming alice was not installed\n{}", daemon_log(&d));
        drop(d);

        let mut opts = DaemonOptions::in_dir(ckptd_exe(), d_path);
        opts.extra_args = vec!["--config".into(), d_path.join("ckptd.toml").into()];
        opts.start_timeout = Duration::from_secs(20);
        let log = opts.log_file.clone();
        // A restart keeps the floor: on a copy older than the list the node last ran with
        // (number 4, which un-revokes alice) it does not start, and says which file to remove
        // to go back on purpose.
        let floor = opts.data_dir.join("crl-floor.json");
        replace(d_path, "crl.pem", &crl(&ca, 4, &[102], (2025, 2099)));
        let logged = std::fs::read_to_string(&log).unwrap_or_default().len();
        assert!(LocalDaemon::start(opts.clone()).await.is_err(), "ckptd restarted on an older revocation list");
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            text[logged..].contains("(number 4, issued at")
                && text[logged..].contains("older than the one in force (number 5")
                && text[logged..].contains(&floor.display().to_string()),
            "{text}"
        );
        // The list it last ran with starts it, with alice still refused.
        replace(d_path, "crl.pem", &crl(&ca, 5, &[101, 102], (2025, 2099)));
        let d = LocalDaemon::start(opts.clone()).await.unwrap();
        let (carol_pem, carol_key) = numbered_leaf(&ca, &name, ExtendedKeyUsagePurpose::ClientAuth, Some(103));
        let addr = d.url().trim_start_matches("http://").to_string();
        assert!(answered(&addr, &client_config(&ca.pem, &carol_pem, &carol_key)).await, "{}", daemon_log(&d));
        assert!(
            !answered(&addr, &client_config(&ca.pem, &alice_pem, &alice_key)).await,
            "alice let in after a restart"
        );
        // A second ckptd started by mistake on the same data directory, on a newer list of its
        // own, fails at the index and writes nothing: the floor stays the running node's.
        let floor_number = || {
            let kept: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&floor).unwrap()).unwrap();
            kept["issuers"][0]["number"].clone()
        };
        assert_eq!(floor_number(), serde_json::json!([5]));
        let second = std::fs::read_to_string(d_path.join("ckptd.toml")).unwrap().replace("crl.pem", "crl-b.pem");
        write(d_path, "crl-b.pem", &crl(&ca, 6, &[], (2025, 2099)));
        let mut b = opts.clone();
        b.extra_args = vec!["--config".into(), write(d_path, "ckptd-b.toml", &second).into()];
        b.log_file = d_path.join("ckptd-b.log");
        assert!(LocalDaemon::start(b).await.is_err(), "a second ckptd ran on one data directory");
        assert_eq!(floor_number(), serde_json::json!([5]), "the second ckptd wrote the floor");
        drop(d);
        // With the floor removed, the operator's older list is taken, and is the floor from
        // then on (written at start, once the node owns its data directory).
        std::fs::remove_file(&floor).unwrap();
        replace(d_path, "crl.pem", &crl(&ca, 4, &[102], (2025, 2099)));
        drop(LocalDaemon::start(opts.clone()).await.unwrap());
        assert_eq!(floor_number(), serde_json::json!([4]));

        // At start-up a list that does not parse is an error that names the file, and so is a
        // list without a CA to check it against.
        replace(d_path, "crl.pem", "not pem at all\n");
        assert!(
            LocalDaemon::start(opts.clone()).await.is_err(),
            "ckptd started on a revocation list that does not parse"
        );
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(text.contains("crl.pem") && text.contains("revocation list"), "{text}");
        // So is a list under the CA's name that its key did not sign.
        replace(d_path, "crl.pem", &crl(&new_ca("ckpt test ca"), 1, &[], (2025, 2099)));
        let logged = text.len();
        assert!(LocalDaemon::start(opts).await.is_err(), "ckptd started on a forged revocation list");
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(text[logged..].contains("signature does not verify with the key of \"CN=ckpt test ca\""), "{text}");
        // Only an older list is the floor's doing: no hint to remove it here.
        assert!(!text[logged..].contains(&floor.display().to_string()), "{text}");
        let no_ca = write(
            d_path,
            "no-ca.toml",
            &format!(
                "[tls]\ncert = \"server.pem\"\nkey = \"server.key\"\nclient_crl = \"{}\"\n",
                d_path.join("crl.pem").display()
            ),
        );
        let out = std::process::Command::new(ckptd_exe()).arg("--check-config").arg(&no_ca).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("tls.client_crl needs tls.client_ca"), "{err}");
    })
    .await
}

/// A connection opened before a revocation is closed at `connection_max_age_s`, once its
/// request in flight is answered; the client connects again and its revoked certificate fails
/// the handshake. Without the age limit the pooled connection would go on being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_connections_are_closed_at_their_maximum_age_so_a_revocation_reaches_them() {
    bounded(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let d_path = dir.path();
        let ca = ca_and_server(d_path);
        let (bob_pem, bob_key) =
            numbered_leaf(&ca, &["team-a.clients.test"], ExtendedKeyUsagePurpose::ClientAuth, Some(102));
        write(d_path, "crl.pem", &crl(&ca, 1, &[], (2025, 2099)));
        let crl_line = format!("client_cert_required = true\nclient_crl = \"{}\"", d_path.join("crl.pem").display());
        let d = start_with(d_path, "connection_max_age_s = 3", &crl_line).await;
        let files = TlsFiles {
            ca: Some(d_path.join("ca.pem")),
            cert: Some(write(d_path, "bob.pem", &bob_pem)),
            key: Some(write(d_path, "bob.key", &bob_key)),
        };
        // One client throughout: its pool keeps the connection open between requests.
        let bob = client(&d, None, files);
        bob.list("a-x").await.unwrap();

        replace(d_path, "crl.pem", &crl(&ca, 2, &[102], (2025, 2099)));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !daemon_log(&d).contains("revocation lists reloaded") {
            assert!(tokio::time::Instant::now() < deadline, "the new list was not read\n{}", daemon_log(&d));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let revoked = std::time::Instant::now();
        loop {
            match bob.list("a-x").await {
                Ok(_) => {}
                Err(ckpt_client::ClientError::Transport { .. }) => break,
                Err(e) => panic!("neither served nor refused at the handshake: {e}"),
            }
            assert!(
                revoked.elapsed() < Duration::from_secs(15),
                "a connection opened before the revocation was still served after 15 s\n{}",
                daemon_log(&d)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // That error may be a request that met its connection closing; the next one is on a new
        // connection, whose handshake is refused.
        assert!(
            matches!(bob.list("a-x").await, Err(ckpt_client::ClientError::Transport { .. })),
            "a new connection after the revocation was served"
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !daemon_log(&d).contains("tls handshake refused a client certificate") {
            assert!(tokio::time::Instant::now() < deadline, "no refused handshake\n{}", daemon_log(&d));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}
