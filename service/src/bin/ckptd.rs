//! The ckptd binary: configuration from defaults, a TOML file, environment and flags.

use std::path::PathBuf;

use anyhow::Context;
use ckpt_service::Config;
use clap::Parser;

/// ckptd — the ckpt checkpoint service.
///
/// Precedence: flag > environment variable > config file > built-in default.
/// `ckptd --print-config` shows the effective configuration with every default.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// TOML config file.
    #[arg(long, env = "CKPTD_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, env = "CKPTD_LISTEN")]
    listen: Option<String>,
    /// Object store: a directory, file:///abs/dir, memory://, s3://bucket/prefix,
    /// gs://bucket/prefix or az://container/prefix (credentials from the SDK's environment).
    #[arg(long, env = "CKPTD_STORE")]
    store: Option<String>,
    /// Directory for the local index and journal.
    #[arg(long, env = "CKPTD_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Write the bound address to this file once ready.
    #[arg(long, env = "CKPTD_ADDR_FILE")]
    addr_file: Option<PathBuf>,
    /// Largest chunk accepted, in bytes.
    #[arg(long, env = "CKPTD_CHUNK_BYTES_MAX")]
    chunk_bytes_max: Option<u64>,
    /// Chunk transfers served at once.
    #[arg(long, env = "CKPTD_CHUNK_REQUESTS_MAX")]
    chunk_requests_max: Option<usize>,
    /// Drop a request body that sends nothing for this long (ms).
    #[arg(long, env = "CKPTD_BODY_PROGRESS_TIMEOUT_MS")]
    body_progress_timeout_ms: Option<u64>,
    /// Close a connection whose request head is not complete within this long (ms).
    #[arg(long, env = "CKPTD_HEADER_READ_TIMEOUT_MS")]
    header_read_timeout_ms: Option<u64>,
    /// Saves in flight at once.
    #[arg(long, env = "CKPTD_SAVES_IN_FLIGHT_MAX")]
    saves_in_flight_max: Option<usize>,
    /// Chunk bytes held in memory (staging budget).
    #[arg(long, env = "CKPTD_STAGING_MEMORY_BYTES_MAX")]
    staging_memory_bytes_max: Option<u64>,
    /// Chunk bytes staged on the spill disk.
    #[arg(long, env = "CKPTD_STAGING_SPILL_BYTES_MAX")]
    staging_spill_bytes_max: Option<u64>,
    /// Upload pace in bytes per second (0: unlimited).
    #[arg(long, env = "CKPTD_UPLOAD_BYTES_PER_S")]
    upload_bytes_per_s: Option<u64>,
    /// Uploads in flight.
    #[arg(long, env = "CKPTD_UPLOAD_CONCURRENCY")]
    upload_concurrency: Option<usize>,
    /// zstd level (0: off).
    #[arg(long, env = "CKPTD_COMPRESSION_LEVEL")]
    compression_level: Option<i32>,
    /// Arm store faults through `POST /v1/faults` (chaos runs and tests only).
    #[arg(long, env = "CKPTD_FAULT_INJECTION")]
    fault_injection: bool,
    /// Faults to arm at start, as a JSON list of fault requests (needs --fault-injection).
    #[arg(long, env = "CKPTD_FAULT_PLAN")]
    fault_plan: Option<String>,
    /// Read a bearer token from standard input and print the blake3 hash that a tenant's
    /// `token_blake3` holds for it, then exit.
    #[arg(long, conflicts_with = "new_token")]
    hash_token: bool,
    /// Make a new random bearer token: prints the token (give it to the tenant's clients as
    /// CKPT_TOKEN or CKPT_TOKEN_FILE) and, on a second line, its hash for `token_blake3`.
    #[arg(long)]
    new_token: bool,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// Load and validate this configuration file (bounds, store URL and options) and exit,
    /// touching nothing: for deploy pipelines and CI.
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    check_config: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line, no backtrace: RUST_BACKTRACE is for bugs, not for a taken port.
            eprintln!("ckptd: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    // Chunk buffers are megabytes; with glibc's adaptive threshold, freed ones would stay in the
    // heap and RSS would drift above the staging budget. A fixed threshold maps every buffer of
    // 1 MiB or more separately and returns it to the OS when it is freed.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
    let args = Args::parse();
    if args.hash_token {
        let mut token = String::new();
        std::io::stdin().read_line(&mut token).context("reading the token from standard input")?;
        let token = token.trim_end_matches(['\r', '\n']);
        anyhow::ensure!(!token.is_empty(), "no token on standard input");
        println!("{}", blake3::hash(token.as_bytes()).to_hex());
        return Ok(());
    }
    if args.new_token {
        // 256 random bits from the OS generator, as hex: safe in headers, files and env vars.
        let token: [u8; 32] = rand::random();
        let token: String = token.iter().map(|b| format!("{b:02x}")).collect();
        println!("{token}\n{}", blake3::hash(token.as_bytes()).to_hex());
        return Ok(());
    }
    if let Some(path) = &args.check_config {
        let config = Config::from_toml_file(path)?;
        config.validate()?;
        ckpt_service::store::check_location(&config.store, &config.store_options)
            .with_context(|| format!("{}: store", path.display()))?;
        println!("{}: ok (store {})", path.display(), config.store);
        return Ok(());
    }
    let mut config = match &args.config {
        Some(p) => Config::from_toml_file(p)?,
        None => Config::default(),
    };
    if let Some(v) = args.listen {
        config.listen = v;
    }
    if let Some(v) = args.store {
        config.store = v;
    }
    if let Some(v) = args.data_dir {
        config.data_dir = v;
    }
    if let Some(v) = args.addr_file {
        config.addr_file = Some(v);
    }
    if let Some(v) = args.chunk_bytes_max {
        config.chunk_bytes_max = v;
    }
    if let Some(v) = args.chunk_requests_max {
        config.chunk_requests_max = v;
    }
    if let Some(v) = args.body_progress_timeout_ms {
        config.body_progress_timeout_ms = v;
    }
    if let Some(v) = args.header_read_timeout_ms {
        config.header_read_timeout_ms = v;
    }
    if let Some(v) = args.saves_in_flight_max {
        config.saves_in_flight_max = v;
    }
    if let Some(v) = args.staging_memory_bytes_max {
        config.staging_memory_bytes_max = v;
    }
    if let Some(v) = args.staging_spill_bytes_max {
        config.staging_spill_bytes_max = v;
    }
    if let Some(v) = args.upload_bytes_per_s {
        config.upload_bytes_per_s = v;
    }
    if let Some(v) = args.upload_concurrency {
        config.upload_concurrency = v;
    }
    if let Some(v) = args.compression_level {
        config.compression_level = v;
    }
    if args.fault_injection {
        config.fault_injection = true;
    }
    if let Some(plan) = &args.fault_plan {
        config.fault_plan = serde_json::from_str(plan).context("--fault-plan: a JSON list of fault requests")?;
    }
    config.validate()?;
    if args.print_config {
        // Every setting, the derived directories included (TOML has no null: an unset
        // addr_file is a comment).
        let mut shown = config.clone();
        shown.spill_dir = Some(config.spill_dir());
        shown.handoff_dir = Some(config.handoff_dir());
        if shown.addr_file.is_none() {
            println!("# addr_file is not set (ckptd writes its bound address nowhere)");
        }
        print!("{}", toml::to_string_pretty(&shown).context("rendering config")?);
        return Ok(());
    }
    // Metrics always (served at /metrics); metrics and spans over OTLP when
    // OTEL_EXPORTER_OTLP_ENDPOINT is set. The exporters run on their own threads.
    let telemetry = std::sync::Arc::new(ckpt_telemetry::Telemetry::init("ckptd")?);
    {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        let filter = tracing_subscriber::EnvFilter::try_from_env("CKPTD_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let fmt = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none());
        let otel = telemetry.otlp_endpoint().is_some().then(|| telemetry.tracing_layer("ckptd"));
        tracing_subscriber::registry().with(filter).with(fmt).with(otel).init();
    }
    if let Some(endpoint) = telemetry.otlp_endpoint() {
        tracing::info!(endpoint, "exporting metrics and spans over OTLP");
    }
    // Fail points are compiled in only with the `failpoints` feature and armed only through
    // the FAILPOINTS environment variable; crash tests use them.
    let _failpoints = fail::FailScenario::setup();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    let served = runtime.block_on(ckpt_service::serve(config, Some(telemetry.clone())));
    telemetry.shutdown();
    Ok(served?)
}
