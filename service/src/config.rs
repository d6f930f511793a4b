//! ckptd's configuration: defaults, overridden by a TOML file, overridden by environment
//! variables and flags (clap reads both; a flag beats its variable).

use std::path::PathBuf;

use ckpt_core::Limits;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the HTTP API listens on. Port 0 picks a free port (see `addr_file`).
    pub listen: String,
    /// Where checkpoints live: an object_store URL (`file:///abs/dir`, `memory://`) or a plain
    /// directory path. A directory is opened with fsync on.
    pub store: String,
    /// object_store configuration for a cloud store, on top of its SDK's environment
    /// variables: `endpoint`, `region`, `allow_http` (S3-compatible stores on plain HTTP), ...
    pub store_options: std::collections::BTreeMap<String, String>,
    /// Local state: the sled index and journal.
    pub data_dir: PathBuf,
    /// What start-up does with a damaged index (a power cut on a disk that lies about its
    /// flushes): one sled cannot open, one whose roots and journal it cannot read at open, or
    /// one marked damaged (damage met later stops ckptd, see `index.rs`): `rebuild` renames it
    /// to `<data_dir>/index.damaged` (what a link named `index` names, to `<that>.damaged`),
    /// replacing an older one, and rebuilds from the store, which loses no committed checkpoint and no fence (both are in the store) but
    /// forgets the saves in flight (their ranks send them again); `refuse` stops ckptd with the
    /// error, for an operator to look.
    pub on_damaged_index: DamagedIndex,
    /// If set, the bound address is written here once ckptd is ready (for scripts and tests).
    pub addr_file: Option<PathBuf>,
    /// Largest chunk accepted, in bytes.
    pub chunk_bytes_max: u64,
    /// Largest shard index accepted, in bytes of JSON.
    pub shard_index_bytes_max: u64,
    /// Chunk uploads and downloads served at once; more wait up to `busy_wait_ms`, then get 503.
    pub chunk_requests_max: usize,
    /// Shard-index puts served at once (each holds its body, up to `shard_index_bytes_max`);
    /// more wait up to `busy_wait_ms`, then get 503.
    pub index_requests_max: usize,
    /// JSON bodies (shard indexes, existence queries, opens, adopts) held at once, in bytes:
    /// each request takes its declared length, else its route's limit, when its first bytes
    /// arrive, and holds it until it is answered.
    pub json_bytes_in_flight_max: u64,
    /// How long a request waits for a free slot before ckptd answers 503 with Retry-After.
    pub busy_wait_ms: u64,
    /// A request body that delivers no bytes for this long is dropped (408): a stalled client
    /// must not keep its chunk slot and staging space. A connection whose answer the client
    /// does not read (a write that makes no progress for this long) is closed, for the same
    /// reason: a chunk being sent holds its chunk slot until it is sent.
    pub body_progress_timeout_ms: u64,
    /// A request body must arrive at this average rate or better: one of N bytes (its
    /// Content-Length, else the JSON limit) that has not arrived within
    /// `body_progress_timeout_ms` + N / this rate is dropped (408), however steadily it
    /// trickles. Bounds how long a slow or hostile client holds a slot and its staging space.
    pub body_min_bytes_per_s: u64,
    /// A connection that has not sent a complete request head this long after it opened (or
    /// after its previous request) is closed.
    pub header_read_timeout_ms: u64,
    /// Connections served at once; more wait in the listen backlog until one closes. Each
    /// costs buffers and a task (about 70 KiB at 16,384), which no other limit covers.
    pub connections_max: usize,
    /// A connection open this long is closed once its request in flight is answered (0: never);
    /// the client connects again. Bounds how long a revoked client certificate keeps working
    /// on a connection opened before the revocation.
    pub connection_max_age_s: u64,
    /// How often ckptd retries the commit of a save whose chunks are all durable but whose
    /// manifest write failed (the store's own retries exhausted).
    pub commit_retry_ms: u64,
    /// A node whose part of a save split over nodes has waited this long for the root lists
    /// the parts itself (the leader may have died after writing its part); later by up to as
    /// much again the higher its first rank, so takeovers are staggered (`parts.rs`).
    pub part_takeover_ms: u64,
    /// Saves open (not yet committed or aborted) at once, over all jobs.
    pub saves_in_flight_max: usize,
    /// Chunk references one save may hold over all its ranks' indexes (a 405B checkpoint in
    /// 4 MiB chunks holds about 1.5 M).
    pub save_chunk_refs_max: u64,
    /// Chunk references all saves in flight may hold together: bounds the memory of the indexes
    /// ckptd keeps for them (about 100 bytes a reference).
    pub in_flight_chunk_refs_max: u64,
    /// Bytes of shard indexes one save may hold (their objects' size: tensor names, shapes and
    /// metadata as well as chunk references); an index past it is refused (400).
    pub save_index_bytes_max: u64,
    /// Bytes of shard indexes all saves in flight hold together; past it an index waits (503).
    pub in_flight_index_bytes_max: u64,
    /// A save in flight that makes no progress (no open, no index, no chunk of it made durable)
    /// for this long is aborted and frees its slot: its ranks died or were never started.
    pub save_idle_abort_ms: u64,
    /// The longest a status query may wait for its save to end (`?wait_ms=`).
    pub status_wait_ms_max: u64,
    /// The longest `/readyz` waits for its probe of the store and the state disk; slower is not
    /// ready.
    pub ready_probe_timeout_ms: u64,
    /// Object-store calls a single request may have in flight (existence checks fan out).
    pub store_requests_max: usize,
    /// Attempts for a store call that fails with a transient error.
    pub store_attempts_max: u32,
    /// First retry delay; doubles on each attempt.
    pub store_retry_base_ms: u64,
    /// Hashes one "which are missing" query may ask about.
    pub missing_query_hashes_max: usize,
    /// Seconds in-flight requests get to finish after SIGTERM.
    pub shutdown_grace_s: u64,
    /// Memory sled may use for its page cache (the index and journal).
    pub index_cache_bytes_max: u64,
    pub world_size_max: u32,
    pub tensors_per_rank_max: usize,
    /// Chunk bytes held in memory: chunks being received, staged, or waiting for upload.
    pub staging_memory_bytes_max: u64,
    /// Chunk bytes staged on the local spill disk once memory is full.
    pub staging_spill_bytes_max: u64,
    /// Spill directory; defaults to `<data_dir>/spill`.
    pub spill_dir: Option<PathBuf>,
    /// Uploads to the object store in flight at once.
    pub upload_concurrency: usize,
    /// Upload pace in stored bytes per second; 0 means as fast as the store takes them.
    pub upload_bytes_per_s: u64,
    /// Staged chunks queued for upload (each also holds staging space).
    pub upload_queue_max: usize,
    /// zstd level for stored chunks; 0 stores every chunk raw.
    pub compression_level: i32,
    /// A chunk is stored compressed only if that saves at least this percentage.
    pub compression_min_savings_pct: u32,
    /// Directory where clients on this host hand chunk files to ckptd (the node-local path);
    /// defaults to `<data_dir>/handoff`. Only files directly inside it are accepted.
    pub handoff_dir: Option<PathBuf>,
    /// Shared-memory segments registered at once (clients on this host pass their staging
    /// buffers to ckptd through `<data_dir>/segments.sock`); 0 turns the path off.
    pub segments_max: usize,
    /// Chunks encoded at once (each holds a plane buffer and a zstd context, several MiB);
    /// defaults to the cores.
    pub encoders_max: usize,
    /// Wraps the store in a fault injector armed through `POST /v1/faults` (chaos runs and
    /// tests only: anyone who can reach the API can then make the store fail).
    /// Retention policy and garbage collection (`[retention]`, `[retention.jobs.<job>]`).
    pub retention: RetentionConfig,
    pub fault_injection: bool,
    /// Tenants (`[[tenants]]`). None: ckptd is open to anyone who can connect (a single
    /// team's node, the embedded default). Any: every request but the probes must authenticate
    /// as one of them, and sees only its own jobs (`auth.rs`).
    pub tenants: Vec<TenantConfig>,
    /// TLS for the API (`[tls]`); when set, ckptd speaks only TLS on its port.
    pub tls: Option<TlsConfig>,
    /// Faults armed before recovery runs (needs `fault_injection`): how a test faults the
    /// calls ckptd makes at start-up.
    pub fault_plan: Vec<crate::faults::FaultRequest>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:7070".into(),
            store: "ckpt-data/store".into(),
            store_options: Default::default(),
            data_dir: PathBuf::from("ckpt-data/state"),
            on_damaged_index: DamagedIndex::Rebuild,
            addr_file: None,
            chunk_bytes_max: 64 << 20,
            shard_index_bytes_max: 64 << 20,
            chunk_requests_max: 64,
            index_requests_max: 1024,
            json_bytes_in_flight_max: 1 << 30,
            busy_wait_ms: 2_000,
            body_progress_timeout_ms: 10_000,
            body_min_bytes_per_s: 64 << 10,
            header_read_timeout_ms: 10_000,
            connections_max: 32_768,
            connection_max_age_s: 600,
            commit_retry_ms: 1_000,
            part_takeover_ms: 30_000,
            saves_in_flight_max: 256,
            save_chunk_refs_max: 2_000_000,
            in_flight_chunk_refs_max: 4_000_000,
            save_index_bytes_max: 2 << 30,
            in_flight_index_bytes_max: 4 << 30,
            save_idle_abort_ms: 900_000,
            status_wait_ms_max: 30_000,
            ready_probe_timeout_ms: 4_000,
            store_requests_max: 32,
            store_attempts_max: 5,
            store_retry_base_ms: 50,
            missing_query_hashes_max: 100_000,
            shutdown_grace_s: 30,
            index_cache_bytes_max: 256 << 20,
            world_size_max: 65_536,
            tensors_per_rank_max: 100_000,
            staging_memory_bytes_max: 1 << 30,
            staging_spill_bytes_max: 8 << 30,
            spill_dir: None,
            upload_concurrency: 4,
            upload_bytes_per_s: 0,
            upload_queue_max: 65_536,
            compression_level: 3,
            compression_min_savings_pct: 10,
            handoff_dir: None,
            segments_max: 256,
            encoders_max: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
            retention: RetentionConfig::default(),
            fault_injection: false,
            tenants: Vec::new(),
            tls: None,
            fault_plan: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DamagedIndex {
    Rebuild,
    Refuse,
}

/// One tenant: who it is (bearer tokens, client-certificate names), which jobs are its own
/// (name prefixes), and its quotas.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Letters, digits, `-` and `_`: it names the tenant's handoff directory.
    pub name: String,
    /// The blake3 (hex) of each bearer token this tenant may present (`ckptd --hash-token`);
    /// several let a token be rotated. Tokens themselves are never stored.
    #[serde(default)]
    pub token_blake3: Vec<String>,
    /// Job names starting with any of these are this tenant's (`""`: every job).
    pub job_prefixes: Vec<String>,
    /// May run GC over every job, read `/v1/stats` and `/metrics` and arm faults.
    #[serde(default)]
    pub admin: bool,
    /// Under mutual TLS, a client certificate from `tls.client_ca` whose DNS name (subject
    /// alternative name) is one of these authenticates as this tenant.
    #[serde(default)]
    pub client_cert_names: Vec<String>,
    /// Owner of the tenant's handoff directory (mode 0700), so only its processes write there.
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub quota: TenantQuota,
}

/// Per-tenant limits; a tenant over one is answered 429 with Retry-After, and no other tenant
/// notices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantQuota {
    /// Saves of the tenant's jobs open at once.
    pub saves_in_flight_max: Option<usize>,
    /// Requests per second, with bursts of as many.
    pub requests_per_s: Option<u32>,
    /// Stored chunk bytes of the tenant's jobs known to this node; a new save is refused above
    /// it (usage is measured at most every `usage_refresh_s`).
    pub stored_bytes_max: Option<u64>,
    /// Percentage of the staging budget (memory plus spill) the tenant's staged chunks may hold.
    pub staging_share_pct: u32,
    /// Percentage of `chunk_requests_max` the tenant's chunk transfers may hold.
    pub chunk_share_pct: u32,
    /// Percentage of `index_requests_max` the tenant's shard-index puts may hold (a put holds
    /// its slot from before its body is read until it is answered).
    pub index_share_pct: u32,
    pub usage_refresh_s: u64,
}

impl Default for TenantQuota {
    fn default() -> Self {
        TenantQuota {
            saves_in_flight_max: None,
            requests_per_s: None,
            stored_bytes_max: None,
            staging_share_pct: 100,
            chunk_share_pct: 100,
            index_share_pct: 100,
            usage_refresh_s: 30,
        }
    }
}

/// TLS for the API. The certificate and key are read again whenever their files change
/// (checked every `reload_s`), so a renewed certificate needs no restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates that sign client certificates: turns on mutual TLS.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: refuse a connection without a valid client certificate (otherwise a
    /// client may still authenticate with a bearer token).
    #[serde(default)]
    pub client_cert_required: bool,
    /// With `client_ca`: PEM certificate revocation lists, one from each CA in the chains of
    /// client certificates. A revoked certificate fails its handshake, so does one whose
    /// revocation status no list gives, and so does every one once a list is past its next
    /// update (a stale list is not trusted). Read again when the file changes.
    #[serde(default)]
    pub client_crl: Option<PathBuf>,
    #[serde(default = "default_reload_s")]
    pub reload_s: u64,
}

fn default_reload_s() -> u64 {
    10
}

/// Which checkpoints GC keeps, and its timings. The top-level policy applies to every job
/// without its own entry under `jobs`; a policy with nothing set keeps every checkpoint (GC
/// then only collects what deleted checkpoints left behind).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    pub keep_last: Option<u64>,
    pub keep_every: Option<u64>,
    /// Per-job policies, replacing the top-level one for that job.
    pub jobs: std::collections::BTreeMap<String, ckpt_core::gc::RetentionPolicy>,
    /// Nothing younger than this is condemned, and a condemned list is swept no sooner than
    /// this after it was written: longer than a save takes from its `missing` query to its
    /// index put.
    pub gc_grace_s: u64,
    /// A save's lease (how GC on any node learns it is in flight) lapses this long after its
    /// node last refreshed it; refreshed every third of it.
    pub lease_s: u64,
    /// GC runs this node makes at once, over different jobs (a job has one run at a time,
    /// across nodes). Each holds its job's object listings in memory, about 300 bytes per
    /// object at most (3 GiB per ten million); more wait up to `busy_wait_ms`, then get 503.
    pub gc_runs_max: usize,
    /// A job's GC lock not rewritten for this long is taken over by another node (its run is
    /// taken for dead). A run rewrites it every 24th of this and stops, deleting nothing more,
    /// once its last rewrite is half of this old (`gc_lock.rs`), so clocks may disagree by up
    /// to half of it, less the store's time granularity (a second on S3).
    pub gc_lock_stale_s: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            keep_last: None,
            keep_every: None,
            jobs: Default::default(),
            gc_grace_s: 3600,
            lease_s: 120,
            gc_runs_max: 2,
            gc_lock_stale_s: 6 * 3600,
        }
    }
}

impl RetentionConfig {
    pub fn policy_for(&self, job: &str) -> ckpt_core::gc::RetentionPolicy {
        self.jobs
            .get(job)
            .copied()
            .unwrap_or(ckpt_core::gc::RetentionPolicy { keep_last: self.keep_last, keep_every: self.keep_every })
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let top = ckpt_core::gc::RetentionPolicy { keep_last: self.keep_last, keep_every: self.keep_every };
        top.validate().map_err(|e| ConfigError::Invalid(format!("retention: {e}")))?;
        for (job, p) in &self.jobs {
            ckpt_core::validate_job(job).map_err(|e| ConfigError::Invalid(format!("retention.jobs: {e}")))?;
            p.validate().map_err(|e| ConfigError::Invalid(format!("retention.jobs.{job}: {e}")))?;
        }
        if self.gc_grace_s == 0 || self.lease_s == 0 {
            return Err(ConfigError::Invalid("retention: gc_grace_s and lease_s must be positive".into()));
        }
        if self.gc_runs_max == 0 {
            return Err(ConfigError::Invalid("retention: gc_runs_max must be at least 1".into()));
        }
        if self.gc_lock_stale_s < 2 {
            return Err(ConfigError::Invalid(
                "retention: gc_lock_stale_s must be at least 2 (a run's lease is half of it, in whole seconds of store time)".into(),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config file {path}: {source}")]
    Parse { path: PathBuf, source: Box<toml::de::Error> },
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// The most bytes ckptd reads of a file an operator names (config, certificate, key,
/// revocation list): far above any real one, so a path pointed at a device or a huge file by
/// mistake is refused rather than read into memory.
pub const OPERATOR_FILE_BYTES_MAX: u64 = 64 << 20;

/// Reads a file an operator named: a regular file (a FIFO would block the reader for good)
/// of at most `OPERATOR_FILE_BYTES_MAX` bytes.
pub(crate) fn read_operator_file(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use std::io::{Error, ErrorKind, Read};
    use std::os::unix::fs::OpenOptionsExt;
    // Non-blocking, or opening a FIFO would itself wait for a writer; a regular file's reads
    // do not heed the flag.
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(Error::new(ErrorKind::InvalidInput, "not a regular file"));
    }
    let mut bytes = Vec::with_capacity(meta.len().min(OPERATOR_FILE_BYTES_MAX) as usize);
    f.take(OPERATOR_FILE_BYTES_MAX + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > OPERATOR_FILE_BYTES_MAX {
        return Err(Error::new(ErrorKind::InvalidData, format!("larger than {OPERATOR_FILE_BYTES_MAX} bytes")));
    }
    Ok(bytes)
}

impl Config {
    pub fn from_toml_file(path: &std::path::Path) -> Result<Config, ConfigError> {
        let bytes = read_operator_file(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let text = String::from_utf8(bytes).map_err(|e| ConfigError::Read {
            path: path.into(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.utf8_error()),
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.into(), source: Box::new(source) })
    }

    /// Whether the index must keep each job's stored bytes: only a stored-bytes quota reads them.
    pub fn counts_stored_bytes(&self) -> bool {
        self.tenants.iter().any(|t| t.quota.stored_bytes_max.is_some())
    }

    pub fn handoff_dir(&self) -> PathBuf {
        self.handoff_dir.clone().unwrap_or_else(|| self.data_dir.join("handoff"))
    }

    pub fn spill_dir(&self) -> PathBuf {
        self.spill_dir.clone().unwrap_or_else(|| self.data_dir.join("spill"))
    }

    pub fn limits(&self) -> Limits {
        Limits {
            world_size_max: self.world_size_max,
            tensors_per_rank_max: self.tensors_per_rank_max,
            chunk_bytes_max: self.chunk_bytes_max,
            ..Limits::default()
        }
    }

    /// What one save may hold: its own limit, and never more than all saves in flight may, so
    /// a save is refused (400) rather than left waiting for room only its own end would free.
    pub fn save_chunk_refs_limit(&self) -> u64 {
        self.save_chunk_refs_max.min(self.in_flight_chunk_refs_max)
    }

    /// As `save_chunk_refs_limit`, for the bytes of a save's shard indexes.
    pub fn save_index_bytes_limit(&self) -> u64 {
        self.save_index_bytes_max.min(self.in_flight_index_bytes_max)
    }

    /// Every bound must be positive: a zero would either refuse all work or mean "unbounded".
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("chunk_bytes_max", self.chunk_bytes_max),
            ("shard_index_bytes_max", self.shard_index_bytes_max),
            ("chunk_requests_max", self.chunk_requests_max as u64),
            ("index_requests_max", self.index_requests_max as u64),
            ("saves_in_flight_max", self.saves_in_flight_max as u64),
            ("store_requests_max", self.store_requests_max as u64),
            ("store_attempts_max", self.store_attempts_max as u64),
            ("missing_query_hashes_max", self.missing_query_hashes_max as u64),
            ("world_size_max", self.world_size_max as u64),
            ("tensors_per_rank_max", self.tensors_per_rank_max as u64),
            ("upload_concurrency", self.upload_concurrency as u64),
            ("upload_queue_max", self.upload_queue_max as u64),
            ("encoders_max", self.encoders_max as u64),
            ("commit_retry_ms", self.commit_retry_ms),
            ("part_takeover_ms", self.part_takeover_ms),
            ("save_chunk_refs_max", self.save_chunk_refs_max),
            ("in_flight_chunk_refs_max", self.in_flight_chunk_refs_max),
            ("save_index_bytes_max", self.save_index_bytes_max),
            ("in_flight_index_bytes_max", self.in_flight_index_bytes_max),
            ("json_bytes_in_flight_max", self.json_bytes_in_flight_max),
            ("save_idle_abort_ms", self.save_idle_abort_ms),
            ("index_cache_bytes_max", self.index_cache_bytes_max),
            ("body_progress_timeout_ms", self.body_progress_timeout_ms),
            ("body_min_bytes_per_s", self.body_min_bytes_per_s),
            ("header_read_timeout_ms", self.header_read_timeout_ms),
            ("connections_max", self.connections_max as u64),
            ("ready_probe_timeout_ms", self.ready_probe_timeout_ms),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(ConfigError::Invalid(format!("{name} must be positive")));
            }
        }
        // A tokio semaphore holds at most 2^61 - 1 permits; far past any real need.
        if self.connections_max > 1 << 24 {
            return Err(ConfigError::Invalid(format!("connections_max = {} is over 16777216", self.connections_max)));
        }
        if self.staging_memory_bytes_max.saturating_add(self.staging_spill_bytes_max) < self.chunk_bytes_max {
            return Err(ConfigError::Invalid(
                "staging_memory_bytes_max + staging_spill_bytes_max must hold at least one chunk_bytes_max chunk"
                    .into(),
            ));
        }
        if !self.fault_plan.is_empty() && !self.fault_injection {
            return Err(ConfigError::Invalid("fault_plan needs fault_injection = true".into()));
        }
        if self.fault_plan.len() > crate::faults::ARMED_MAX {
            return Err(ConfigError::Invalid(format!("fault_plan holds at most {} faults", crate::faults::ARMED_MAX)));
        }
        for f in &self.fault_plan {
            f.validate().map_err(|e| ConfigError::Invalid(format!("fault_plan: {e}")))?;
        }
        if self.status_wait_ms_max > 3_600_000 {
            return Err(ConfigError::Invalid("status_wait_ms_max must be at most 3600000 (an hour)".into()));
        }
        if !(0..=22).contains(&self.compression_level) {
            return Err(ConfigError::Invalid("compression_level must be 0 (off) to 22".into()));
        }
        if self.compression_min_savings_pct > 99 {
            return Err(ConfigError::Invalid("compression_min_savings_pct must be at most 99".into()));
        }
        self.retention.validate()?;
        if self.retention.lease_s.saturating_mul(1000) < self.commit_retry_ms.saturating_mul(3) {
            return Err(ConfigError::Invalid(
                "retention.lease_s must be at least three commit_retry_ms periods (leases are refreshed then)".into(),
            ));
        }
        crate::auth::validate_tenants(&self.tenants, self.tls.as_ref())?;
        let staging = self.staging_memory_bytes_max.saturating_add(self.staging_spill_bytes_max);
        for t in &self.tenants {
            let share = (staging as u128 * t.quota.staging_share_pct as u128).div_ceil(100) as u64;
            if share < self.chunk_bytes_max {
                return Err(ConfigError::Invalid(format!(
                    "tenant {:?}: staging_share_pct {} gives {share} bytes, less than one chunk (chunk_bytes_max {})",
                    t.name, t.quota.staging_share_pct, self.chunk_bytes_max
                )));
            }
        }
        if let Some(t) = &self.tls {
            if t.reload_s == 0 {
                return Err(ConfigError::Invalid("tls.reload_s must be positive".into()));
            }
            if t.client_cert_required && t.client_ca.is_none() {
                return Err(ConfigError::Invalid("tls.client_cert_required needs tls.client_ca".into()));
            }
            if t.client_crl.is_some() && t.client_ca.is_none() {
                return Err(ConfigError::Invalid("tls.client_crl needs tls.client_ca".into()));
            }
        }
        if self.chunk_bytes_max > 1 << 30 {
            return Err(ConfigError::Invalid("chunk_bytes_max must be at most 1 GiB".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_files_that_are_not_small_regular_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("ok.pem");
        std::fs::write(&ok, b"bytes").unwrap();
        assert_eq!(read_operator_file(&ok).unwrap(), b"bytes");
        let big = dir.path().join("big.pem");
        std::fs::File::create(&big).unwrap().set_len(OPERATOR_FILE_BYTES_MAX + 1).unwrap();
        let e = read_operator_file(&big).unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
        let at_max = dir.path().join("max.pem");
        std::fs::File::create(&at_max).unwrap().set_len(OPERATOR_FILE_BYTES_MAX).unwrap();
        assert_eq!(read_operator_file(&at_max).unwrap().len() as u64, OPERATOR_FILE_BYTES_MAX);
        // A FIFO with no writer would block a plain read for good.
        let fifo = dir.path().join("fifo.pem");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(read_operator_file(&fifo).map(|b| b.len())));
        let got = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("reading a FIFO blocked");
        assert!(got.unwrap_err().to_string().contains("not a regular file"));
        let cfg = dir.path().join("dir.toml");
        std::fs::create_dir(&cfg).unwrap();
        assert!(matches!(Config::from_toml_file(&cfg), Err(ConfigError::Read { .. })));
    }

    #[test]
    fn toml_overrides_defaults_and_rejects_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "listen = \"127.0.0.1:9\"\nchunk_requests_max = 3\n").unwrap();
        let c = Config::from_toml_file(&p).unwrap();
        assert_eq!(c.listen, "127.0.0.1:9");
        assert_eq!(c.chunk_requests_max, 3);
        assert_eq!(c.saves_in_flight_max, Config::default().saves_in_flight_max);
        std::fs::write(&p, "lisen = \"x\"\n").unwrap();
        assert!(Config::from_toml_file(&p).is_err());
        let zero = Config { chunk_requests_max: 0, ..Config::default() };
        assert!(zero.validate().is_err());
        for zero in [
            Config { body_progress_timeout_ms: 0, ..Config::default() },
            Config { header_read_timeout_ms: 0, ..Config::default() },
            Config { ready_probe_timeout_ms: 0, ..Config::default() },
        ] {
            assert!(zero.validate().unwrap_err().to_string().contains("_timeout_ms must be positive"));
        }
        Config::default().validate().unwrap();
    }
}
