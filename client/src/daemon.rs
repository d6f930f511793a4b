//! Runs ckptd as a child process on this machine: for the demo, for tests, and for anyone who
//! wants a private checkpoint service next to a trainer.
//!
//! Design note. The child writes its bound address to a file once it has recovered and
//! listens; `start` waits for that file (and fails early if the child exits first), so a
//! caller never talks to a half-started daemon. `kill` is a real SIGKILL, `terminate` a real
//! SIGTERM: crash tests rely on both. Dropping a `LocalDaemon` kills the child so no test
//! leaves one behind.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::ClientError;

#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// The ckptd binary; see [`find_ckptd`].
    pub exe: PathBuf,
    pub store: String,
    pub data_dir: PathBuf,
    /// ckptd's log goes here (appended, so restarts keep earlier output).
    pub log_file: PathBuf,
    pub extra_args: Vec<OsString>,
    pub envs: Vec<(String, String)>,
    pub start_timeout: Duration,
    /// Nice value for ckptd (0: inherit). Running the service below the trainer's priority
    /// keeps checkpoint work from slowing training steps on a shared host.
    pub nice: i32,
    /// Restarts listen on the address the first start bound, so clients keep their URL (a
    /// supervised ckptd); otherwise every start takes a free port.
    pub keep_address: bool,
}

impl DaemonOptions {
    /// A daemon whose store and state live under `dir`.
    pub fn in_dir(exe: PathBuf, dir: &Path) -> DaemonOptions {
        DaemonOptions {
            exe,
            store: dir.join("store").to_string_lossy().into_owned(),
            data_dir: dir.join("state"),
            log_file: dir.join("ckptd.log"),
            extra_args: Vec::new(),
            envs: Vec::new(),
            start_timeout: Duration::from_secs(60),
            nice: 0,
            keep_address: false,
        }
    }
}

/// Finds the ckptd binary: `$CKPTD_BIN`, else next to the running executable, else one folder
/// up (where cargo puts binaries relative to test executables in `deps/`).
pub fn find_ckptd() -> Result<PathBuf, ClientError> {
    if let Ok(p) = std::env::var("CKPTD_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe =
        std::env::current_exe().map_err(|e| ClientError::Daemon(format!("cannot find the running executable: {e}")))?;
    let name = format!("ckptd{}", std::env::consts::EXE_SUFFIX);
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join(&name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(ClientError::Daemon(format!(
        "no ckptd binary next to {} or in its parent folder; build it (`cargo build --workspace --bins`) or set CKPTD_BIN",
        exe.display()
    )))
}

pub struct LocalDaemon {
    opts: DaemonOptions,
    child: Option<Child>,
    addr: String,
}

impl LocalDaemon {
    pub async fn start(opts: DaemonOptions) -> Result<LocalDaemon, ClientError> {
        let mut d = LocalDaemon { opts, child: None, addr: String::new() };
        d.spawn().await?;
        Ok(d)
    }

    async fn spawn(&mut self) -> Result<(), ClientError> {
        let err = |m: String| ClientError::Daemon(m);
        std::fs::create_dir_all(&self.opts.data_dir)
            .map_err(|e| err(format!("creating {}: {e}", self.opts.data_dir.display())))?;
        let addr_file = self.opts.data_dir.join("ckptd.addr");
        let _ = std::fs::remove_file(&addr_file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.opts.log_file)
            .map_err(|e| err(format!("opening {}: {e}", self.opts.log_file.display())))?;
        let listen = match self.opts.keep_address && !self.addr.is_empty() {
            true => self.addr.clone(),
            false => "127.0.0.1:0".to_string(),
        };
        let mut cmd = Command::new(&self.opts.exe);
        cmd.arg("--listen")
            .arg(listen)
            .arg("--store")
            .arg(&self.opts.store)
            .arg("--data-dir")
            .arg(&self.opts.data_dir)
            .arg("--addr-file")
            .arg(&addr_file)
            .args(&self.opts.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| err(e.to_string()))?)
            .stderr(log)
            .env("NO_COLOR", "1");
        for (k, v) in &self.opts.envs {
            cmd.env(k, v);
        }
        #[cfg(target_os = "linux")]
        if self.opts.nice != 0 {
            use std::os::unix::process::CommandExt;
            let nice = self.opts.nice;
            // SAFETY: setpriority is async-signal-safe; it runs in the child before exec, so
            // every thread ckptd starts inherits the value.
            unsafe {
                cmd.pre_exec(move || {
                    libc::setpriority(libc::PRIO_PROCESS, 0, nice);
                    Ok(())
                });
            }
        }
        // ETXTBSY: a program written just now (a test's wrapper script) can still be open for
        // writing in a child another thread forked before its exec closed the descriptor; it
        // is closed within moments.
        let mut busy = 0;
        let mut child = loop {
            match cmd.spawn() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && busy < 50 => {
                    busy += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                other => break other.map_err(|e| err(format!("starting {}: {e}", self.opts.exe.display())))?,
            }
        };
        let deadline = Instant::now() + self.opts.start_timeout;
        loop {
            if let Ok(a) = std::fs::read_to_string(&addr_file) {
                if !a.is_empty() {
                    self.addr = a.trim().to_string();
                    break;
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(err(format!(
                    "ckptd exited during start-up ({status}); see {}",
                    self.opts.log_file.display()
                )));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(err(format!(
                    "ckptd not ready after {:?}; see {}",
                    self.opts.start_timeout,
                    self.opts.log_file.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.child = Some(child);
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn options_mut(&mut self) -> &mut DaemonOptions {
        &mut self.opts
    }

    pub fn options(&self) -> &DaemonOptions {
        &self.opts
    }

    /// SIGKILL, as a crash: nothing is flushed, nothing is finished.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// How the child ended, if it has exited by itself; None while it runs (or was never
    /// started again after a kill).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok().flatten()?;
        self.child = None;
        Some(status)
    }

    /// Waits for the child to exit by itself (for example after a fail point killed it).
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.child.is_none() {
                return Err(ClientError::Daemon("not running".into()));
            }
            if let Some(s) = self.exited() {
                return Ok(s);
            }
            if Instant::now() > deadline {
                return Err(ClientError::Daemon(format!("ckptd still running after {timeout:?}")));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then SIGKILL if ckptd has not exited within `grace`. Returns whether it exited
    /// by itself.
    pub async fn terminate(&mut self, grace: Duration) -> bool {
        let Some(pid) = self.pid() else { return true };
        // SAFETY: kill(2) with a pid we spawned and still hold (not yet reaped).
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
        match self.wait_exit(grace).await {
            Ok(_) => true,
            Err(_) => {
                self.kill();
                false
            }
        }
    }

    /// Starts ckptd again on the same store and state, after a kill or a terminate.
    pub async fn restart(&mut self) -> Result<(), ClientError> {
        self.kill();
        self.spawn().await
    }
}

impl Drop for LocalDaemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// CPU time (user + system, all threads) process `pid` has used so far, in seconds; None where
/// /proc does not say.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3, `state`; utime and
    // stime are fields 14 and 15, in clock ticks.
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (per_s > 0).then(|| ticks as f64 / per_s as f64)
}

/// Peak resident memory (VmHWM) of process `pid`, in bytes; None where /proc does not say.
pub fn peak_rss_bytes(pid: u32) -> Option<u64> {
    status_bytes(pid, "VmHWM:")
}

/// Resident memory now (VmRSS) of process `pid`, in bytes; None where /proc does not say.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    status_bytes(pid, "VmRSS:")
}

fn status_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = status.lines().find_map(|l| l.strip_prefix(field))?.trim().trim_end_matches("kB").trim();
    kb.parse::<u64>().ok().map(|kb| kb * 1024)
}
