//! Durable files: the one place where ckptd makes bytes on a local disk survive a power cut.
//!
//! Design note.
//! * What durable means: a file's bytes are on disk after `fsync` of the file; its name is on
//!   disk only after `fsync` of the directory holding the entry. A directory created on the way
//!   is itself an entry in its parent, so every directory this module creates is fsync'd, and so
//!   is the parent it was created in, up to the first directory that already existed. Without
//!   that, a chunk renamed into a fresh `chunks/<hh>/` directory can vanish after a power cut
//!   although its own directory was fsync'd, because `chunks/` never recorded `<hh>`.
//! * Concurrency: two threads may create the same directory at once. The one that loses the
//!   race (`AlreadyExists`) still fsyncs the parent: otherwise it could return, and ack a chunk,
//!   before the winner's fsync of the parent has happened. A thread that finds the directory
//!   already there has the same problem when the creator is between its `mkdir` and that fsync,
//!   so directories are listed (`CREATING`) from before their `mkdir` to after it, and a thread
//!   that finds a listed one fsyncs its parent too. `write_new_grouped` lists the directories it
//!   makes until its group syncs have covered them.
//! * A failed `syncfs` fails every caller it was to cover, however many syncs fail before they
//!   wake (`FsSync` keeps each failure until no waiting caller's ticket is in its range).
//! * Temporary files are named `.<name>.<pid>-<seq>.tmp` next to their destination, so they are
//!   on the destination's filesystem (the rename is atomic) and parsers of store keys and spill
//!   names ignore them. A crash can leave one behind; it is garbage, never data.
//! * Group commit (`FsSync`): fsync per file and per directory costs one journal commit and one
//!   disk cache flush each, and a burst of 4 MiB chunks paid two per chunk. Callers that make
//!   many files durable at once (node-local adopts) instead ask `FsSync::sync`, which returns
//!   once a `syncfs` of the store's filesystem that *began after the call* has completed; one
//!   caller runs it for everyone waiting, so concurrent adopts share each flush. A syncfs makes
//!   every file's bytes and every directory entry on the filesystem durable, which covers what
//!   the per-file and per-directory fsyncs did, and more.
//! * Everything here blocks: call it from `spawn_blocking`.
//! * Used by the node-local adopt (`adopt.rs`), the spill files of the staging tier
//!   (`staging.rs`), the revocation lists' floor (`crl.rs`), the sled index's flushes
//!   (`index.rs`, a group sync after each) and the directories they need.
//!   Chunk puts to the store go through object_store's local backend, which does the same
//!   (fsync of files and new directories).

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, thiserror::Error)]
pub enum DurableError {
    #[error("cannot create directory {}: {source}", .path.display())]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot fsync {}: {source}", .path.display())]
    Sync { path: PathBuf, source: io::Error },
    #[error("cannot write {}: {source}", .path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot rename {} to {}: {source}", .from.display(), .to.display())]
    Rename { from: PathBuf, to: PathBuf, source: io::Error },
    #[error("{} has no parent directory", .path.display())]
    NoParent { path: PathBuf },
}

impl DurableError {
    pub fn io(&self) -> Option<&io::Error> {
        match self {
            DurableError::CreateDir { source, .. }
            | DurableError::Sync { source, .. }
            | DurableError::Write { source, .. }
            | DurableError::Rename { source, .. } => Some(source),
            DurableError::NoParent { .. } => None,
        }
    }

    /// A rename between two filesystems: the caller has to copy instead.
    pub fn is_cross_device(&self) -> bool {
        matches!(self, DurableError::Rename { source, .. } if source.raw_os_error() == Some(libc::EXDEV))
    }
}

impl From<DurableError> for io::Error {
    fn from(e: DurableError) -> io::Error {
        let kind = e.io().map(io::Error::kind).unwrap_or(io::ErrorKind::Other);
        io::Error::new(kind, e)
    }
}

/// fsync of a directory: makes the entries created, renamed or removed in it durable.
pub fn sync_dir(dir: &Path) -> Result<(), DurableError> {
    #[cfg(test)]
    tests::SYNCED_DIRS.with(|s| s.borrow_mut().push(dir.to_path_buf()));
    File::open(dir).and_then(|d| d.sync_all()).map_err(|source| DurableError::Sync { path: dir.into(), source })
}

/// Creates `dir` and every missing ancestor, durably: each directory that was missing is
/// fsync'd, and so is the directory it was created in. A no-op (no fsync) when `dir` exists.
pub fn ensure_dir(dir: &Path) -> Result<(), DurableError> {
    // The missing directories, deepest first, found before creating any.
    let mut missing = Vec::new();
    let mut d = dir;
    loop {
        match std::fs::metadata(d) {
            Ok(m) if m.is_dir() => {
                // Made by a thread that may not have fsync'd its parent yet (the module note),
                // and so may the directories above it that are listed too (`write_new_grouped`
                // makes a whole path and leaves it to its group sync).
                let mut up = d;
                while creating().contains_key(up) {
                    sync_dir(parent_dir(up))?;
                    up = parent_dir(up);
                }
                break;
            }
            Ok(_) => {
                return Err(DurableError::CreateDir {
                    path: d.into(),
                    source: io::Error::new(io::ErrorKind::AlreadyExists, "exists and is not a directory"),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                missing.push(d);
                match d.parent() {
                    Some(p) if !p.as_os_str().is_empty() => d = p,
                    // A relative path's first component: its parent is the working directory.
                    _ => break,
                }
            }
            Err(source) => return Err(DurableError::CreateDir { path: d.into(), source }),
        }
    }
    // Test-only switch (power-loss audit): leave new directories unsynced.
    let skip_fsync = crate::switch_armed("durable::skip_new_dir_fsync");
    for d in missing.iter().rev() {
        let _listed = Creating::list(d);
        match std::fs::create_dir(d) {
            Ok(()) => {}
            // Created concurrently: its creator may not have fsync'd the parent yet, so the
            // parent is fsync'd below regardless.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && d.is_dir() => {}
            Err(source) => return Err(DurableError::CreateDir { path: d.to_path_buf(), source }),
        }
        if skip_fsync {
            continue;
        }
        sync_dir(d)?;
        sync_dir(parent_dir(d))?;
    }
    Ok(())
}

/// Directories between their `mkdir` and the fsync of their parent, with how many threads are
/// making each.
static CREATING: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<PathBuf, usize>>> =
    std::sync::LazyLock::new(Default::default);

fn creating() -> std::sync::MutexGuard<'static, std::collections::HashMap<PathBuf, usize>> {
    CREATING.lock().unwrap_or_else(|e| e.into_inner())
}

/// One thread's listing of a directory it is making; unlisted when dropped, on every return.
struct Creating(PathBuf);

impl Creating {
    fn list(dir: &Path) -> Creating {
        *creating().entry(dir.to_path_buf()).or_default() += 1;
        Creating(dir.to_path_buf())
    }
}

impl Drop for Creating {
    fn drop(&mut self) {
        let mut listed = creating();
        if let Some(n) = listed.get_mut(&self.0) {
            *n -= 1;
            if *n == 0 {
                listed.remove(&self.0);
            }
        }
    }
}

/// The directory holding `path`; "." for a bare file name.
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Syncs one filesystem for many callers at once; see the module note.
pub struct FsSync {
    fd: File,
    path: PathBuf,
    state: std::sync::Mutex<SyncState>,
    done: std::sync::Condvar,
}

#[derive(Default)]
struct SyncState {
    /// Tickets handed out; a ticket is covered by any syncfs that began after it was taken.
    requested: u64,
    /// Every ticket up to this one is covered.
    completed: u64,
    running: bool,
    /// Failed syncfs calls: each was to cover the tickets `.0..=.1`, which get its error. Kept
    /// while a caller holding one of those tickets has not returned.
    failed: Vec<(u64, u64, String)>,
    /// Tickets whose callers have not returned yet.
    waiting: std::collections::BTreeSet<u64>,
    syncs: u64,
}

impl SyncState {
    /// What the caller holding `ticket` returns, once it is done: the error of the failed sync
    /// that was to cover it, or success once a sync covered it.
    fn outcome(&mut self, ticket: u64) -> Option<Result<(), String>> {
        let failure = self.failed.iter().find(|(from, to, _)| (*from..=*to).contains(&ticket)).map(|f| f.2.clone());
        if failure.is_none() && self.completed < ticket {
            return None;
        }
        self.waiting.remove(&ticket);
        // A failure whose range ends before the oldest waiting ticket can fail no one now.
        let oldest = self.waiting.first().copied().unwrap_or(u64::MAX);
        self.failed.retain(|(_, to, _)| *to >= oldest);
        Some(failure.map_or(Ok(()), Err))
    }
}

impl FsSync {
    /// A group sync for the filesystem holding `dir`.
    pub fn open(dir: &Path) -> Result<FsSync, DurableError> {
        let fd = File::open(dir).map_err(|source| DurableError::Sync { path: dir.into(), source })?;
        Ok(FsSync { fd, path: dir.into(), state: Default::default(), done: Default::default() })
    }

    /// Returns once everything the caller wrote, renamed or created on the filesystem before
    /// this call is durable.
    pub fn sync(&self) -> Result<(), DurableError> {
        use std::os::fd::AsRawFd;
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        g.requested += 1;
        let ticket = g.requested;
        g.waiting.insert(ticket);
        loop {
            if let Some(done) = g.outcome(ticket) {
                return done
                    .map_err(|why| DurableError::Sync { path: self.path.clone(), source: io::Error::other(why) });
            }
            if !g.running {
                g.running = true;
                let (from, target) = (g.completed + 1, g.requested);
                drop(g);
                // SAFETY: syncfs on an fd this struct owns; no memory is passed.
                let r = unsafe { libc::syncfs(self.fd.as_raw_fd()) };
                let err = (r != 0).then(io::Error::last_os_error);
                g = self.state.lock().unwrap_or_else(|e| e.into_inner());
                g.running = false;
                g.syncs += 1;
                if let Some(e) = err {
                    g.failed.push((from, target, e.to_string()));
                }
                g.completed = g.completed.max(target);
                self.done.notify_all();
                continue;
            }
            g = self.done.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// syncfs calls made so far (each shared by every caller waiting at the time).
    pub fn syncs(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).syncs
    }
}

/// Renames `from` to `to`, creating `to`'s directory if needed, without syncing the new entry
/// or directory: the caller makes both durable with [`FsSync::sync`] (a syncfs covers every
/// entry on the filesystem; a fsync per new directory cost a journal commit each, 256 in a
/// fresh job's first save).
pub fn rename_unsynced(from: &Path, to: &Path) -> Result<(), DurableError> {
    let dir = to.parent().ok_or_else(|| DurableError::NoParent { path: to.into() })?;
    std::fs::create_dir_all(dir).map_err(|source| DurableError::CreateDir { path: dir.into(), source })?;
    std::fs::rename(from, to).map_err(|source| DurableError::Rename { from: from.into(), to: to.into(), source })
}

/// Renames `from` (a file whose bytes the caller already fsync'd) to `to`, creating `to`'s
/// directory durably if needed, and fsyncs `to`'s directory: on return the file is durable
/// under its new name. An existing `to` is replaced atomically. Fails with
/// [`DurableError::is_cross_device`] when `from` is on another filesystem.
pub fn rename_into_place(from: &Path, to: &Path) -> Result<(), DurableError> {
    let dir = to.parent().ok_or_else(|| DurableError::NoParent { path: to.into() })?;
    ensure_dir(dir)?;
    std::fs::rename(from, to).map_err(|source| DurableError::Rename { from: from.into(), to: to.into(), source })?;
    // Test-only switch (power-loss audit): leave the renamed entry unsynced.
    fail::fail_point!("durable::skip_rename_dir_fsync", |_| Ok(()));
    sync_dir(parent_dir(to))
}

/// The file [`probe_dir`] writes, directly in the directory it probes.
const PROBE_NAME: &str = "readyz-probe";

/// Whether `dir`'s disk still takes a durable write: a fresh file of one block (so a full disk
/// fails too), fsync'd, then removed. `/readyz` asks it of the state directory, whose disk holds
/// the index every ack is recorded in (unless `index` links elsewhere: ready.rs). The name is
/// fixed, so a probe a crash cut short leaves one small file that the next probe replaces.
pub fn probe_dir(dir: &Path) -> Result<(), DurableError> {
    use std::io::Write;
    let path = dir.join(PROBE_NAME);
    let write = |source| DurableError::Write { path: path.clone(), source };
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(write(e)),
        _ => {}
    }
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&path).map_err(write)?;
    f.write_all(&[0u8; 4096]).map_err(write)?;
    f.sync_all().map_err(|source| DurableError::Sync { path: path.clone(), source })?;
    drop(f);
    std::fs::remove_file(&path).map_err(write)
}

/// Whether a file name is one [`temp_path`] makes (what a crash mid-write can leave behind):
/// `.<name>.<pid>-<seq>.tmp`.
pub fn is_temp_name(name: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let Some(inner) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".tmp")) else { return false };
    inner.rsplit_once('.').is_some_and(|(dest, unique)| {
        !dest.is_empty() && unique.split_once('-').is_some_and(|(pid, seq)| digits(pid) && digits(seq))
    })
}

/// A fresh temporary path next to `dest` (same directory, so same filesystem).
pub fn temp_path(dest: &Path) -> PathBuf {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let unique = format!("{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
    parent_dir(dest).join(format!(".{name}.{unique}.tmp"))
}

/// Writes a new file at `dest` through one fd: `fill` writes the bytes into a temporary file
/// next to `dest`, which is fsync'd and renamed into place, and `dest`'s directory (and every
/// directory created for it) is fsync'd. `dest` never holds a partial file; on error the
/// temporary file is removed.
pub fn write_new<T>(dest: &Path, fill: impl FnOnce(&mut File) -> io::Result<T>) -> Result<T, DurableError> {
    let dir = dest.parent().ok_or_else(|| DurableError::NoParent { path: dest.into() })?;
    ensure_dir(dir)?;
    let tmp = temp_path(dest);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|source| DurableError::Write { path: tmp.clone(), source })?;
        let out = fill(&mut f).map_err(|source| DurableError::Write { path: tmp.clone(), source })?;
        // Test-only switch (power-loss audit): leave the new file's bytes unsynced.
        let skip = crate::switch_armed("durable::skip_file_fsync");
        if !skip {
            f.sync_all().map_err(|source| DurableError::Sync { path: tmp.clone(), source })?;
        }
        drop(f);
        rename_into_place(&tmp, dest)?;
        Ok(out)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes a new file at `dest` made durable by the group sync `fs`: the bytes `image[..len]`
/// go to a temporary file next to `dest` (with `O_DIRECT` when the filesystem takes it, so
/// they travel from `image` to the device without the page cache; `image` must then start at
/// an `align` boundary and be a whole number of `align` blocks), one group sync makes them
/// durable, the file is renamed onto `dest`, and a second group sync makes the name durable.
/// `dest` never names a partial file, even after a power cut; on error the temporary file is
/// removed. Returns whether the write went direct.
pub fn write_new_grouped(dest: &Path, image: &[u8], len: u64, align: usize, fs: &FsSync) -> Result<bool, DurableError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = dest.parent().ok_or_else(|| DurableError::NoParent { path: dest.into() })?;
    // No fsync of new directories: the group syncs below cover every entry on the filesystem.
    // Until they have, the new directories are listed as being made, so a plain durable write
    // that finds one meanwhile syncs its entry itself (`ensure_dir`).
    let mut _listed = Vec::new();
    let mut d = dir;
    while !d.is_dir() {
        _listed.push(Creating::list(d));
        match d.parent() {
            Some(p) if !p.as_os_str().is_empty() => d = p,
            _ => break,
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| DurableError::CreateDir { path: dir.into(), source })?;
    let tmp = temp_path(dest);
    let result = (|| {
        let write = |direct: bool| -> io::Result<()> {
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            if direct {
                opts.custom_flags(libc::O_DIRECT);
            }
            let mut f = opts.open(&tmp)?;
            if direct {
                let padded = (len as usize).next_multiple_of(align);
                let aligned = image.as_ptr().align_offset(align) == 0 && padded <= image.len();
                if !aligned {
                    return Err(io::Error::from_raw_os_error(libc::EINVAL));
                }
                f.write_all(&image[..padded])?;
                f.set_len(len)
            } else {
                f.write_all(&image[..len as usize])
            }
        };
        let direct = match write(true) {
            Ok(()) => true,
            // The filesystem (tmpfs before 6.6, some FUSE mounts) refuses direct I/O.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                let _ = std::fs::remove_file(&tmp);
                write(false).map_err(|source| DurableError::Write { path: tmp.clone(), source })?;
                false
            }
            Err(source) => return Err(DurableError::Write { path: tmp.clone(), source }),
        };
        // Test-only switch (power-loss audit): leave the new file's bytes unsynced.
        let skip = crate::switch_armed("durable::skip_file_fsync");
        #[cfg(test)]
        tests::LISTED_AT_SYNC.with(|l| *l.borrow_mut() = creating().keys().cloned().collect());
        if !skip {
            fs.sync()?;
        }
        std::fs::rename(&tmp, dest).map_err(|source| DurableError::Rename {
            from: tmp.clone(),
            to: dest.into(),
            source,
        })?;
        if !skip {
            fs.sync()?;
        }
        Ok(direct)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    thread_local! {
        /// Every directory `sync_dir` fsync'd on this thread, in order.
        pub(super) static SYNCED_DIRS: std::cell::RefCell<Vec<PathBuf>> = const { std::cell::RefCell::new(Vec::new()) };
        /// The directories listed as being made when `write_new_grouped` began its group sync.
        pub(super) static LISTED_AT_SYNC: std::cell::RefCell<Vec<PathBuf>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    #[test]
    fn directories_a_grouped_write_makes_stay_listed_until_its_sync_and_a_finder_syncs_up_the_chain() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let fs = FsSync::open(r).unwrap();
        let dest = r.join("jobs/j/chunks/ab/chunk");
        write_new_grouped(&dest, b"bytes", 5, 4096, &fs).unwrap();
        let listed: std::collections::BTreeSet<PathBuf> = LISTED_AT_SYNC.with(|l| l.borrow().iter().cloned().collect());
        for d in ["jobs", "jobs/j", "jobs/j/chunks", "jobs/j/chunks/ab"] {
            assert!(
                listed.contains(&r.join(d)),
                "{d} was not listed while its entry waited for the group sync: {listed:?}"
            );
        }
        assert!(!creating().keys().any(|k| k.starts_with(r)), "the listing outlived the write");
        assert_eq!(std::fs::read(&dest).unwrap(), b"bytes");
        // A plain durable write that finds such a chain (its maker still before its sync)
        // syncs every listed directory's entry, up to the first one not listed.
        let made = r.join("x/y");
        std::fs::create_dir_all(&made).unwrap();
        let _maker = (Creating::list(&r.join("x")), Creating::list(&made));
        synced_dirs();
        ensure_dir(&made.join("z")).unwrap();
        let expected: std::collections::BTreeSet<PathBuf> =
            [r.to_path_buf(), r.join("x"), made.clone(), made.join("z")].into_iter().collect();
        assert_eq!(synced_dirs(), expected);
    }

    fn synced_dirs() -> std::collections::BTreeSet<PathBuf> {
        SYNCED_DIRS.with(|s| s.borrow_mut().drain(..).collect())
    }

    #[test]
    fn every_created_directory_and_its_parent_are_fsynced() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        synced_dirs();
        ensure_dir(&r.join("a/b/c")).unwrap();
        let expected: std::collections::BTreeSet<PathBuf> =
            [r.to_path_buf(), r.join("a"), r.join("a/b"), r.join("a/b/c")].into_iter().collect();
        assert_eq!(synced_dirs(), expected, "the first existing directory gained an entry too");
        ensure_dir(&r.join("a/b/c")).unwrap();
        assert!(synced_dirs().is_empty(), "an existing directory needs no fsync");
        std::fs::write(r.join("f"), b"x").unwrap();
        rename_into_place(&r.join("f"), &r.join("a/d/f")).unwrap();
        let expected: std::collections::BTreeSet<PathBuf> = [r.join("a"), r.join("a/d")].into_iter().collect();
        assert_eq!(synced_dirs(), expected, "the destination directory holds the new entry");
    }

    #[test]
    fn a_directory_found_while_its_creator_is_between_mkdir_and_fsync_gets_its_parent_fsynced() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let made = r.join("a/b");
        std::fs::create_dir_all(&made).unwrap();
        synced_dirs();
        // Another thread made `a/b` and has not fsync'd `a` yet.
        let other = Creating::list(&made);
        ensure_dir(&made.join("c")).unwrap();
        let expected: std::collections::BTreeSet<PathBuf> =
            [r.join("a"), made.clone(), made.join("c")].into_iter().collect();
        assert_eq!(synced_dirs(), expected, "the creator's pending fsync of the parent was not done");
        drop(other);
        ensure_dir(&made).unwrap();
        assert!(synced_dirs().is_empty(), "once its creator is done, an existing directory needs no fsync");
        assert!(!creating().contains_key(&made), "the listing outlived its creator");
    }

    #[test]
    fn a_failed_syncfs_fails_its_waiters_even_after_later_ones_fail() {
        let root = tempfile::tempdir().unwrap();
        let fs = FsSync::open(root.path()).unwrap();
        // Two callers wait on two syncs that both failed, recorded before either caller woke.
        {
            let mut g = fs.state.lock().unwrap();
            g.requested = 2;
            g.completed = 2;
            g.waiting.extend([1, 2]);
            g.failed.push((1, 1, "first".into()));
            g.failed.push((2, 2, "second".into()));
        }
        let wake = |ticket: u64| fs.state.lock().unwrap().outcome(ticket).expect("a done caller").err();
        assert_eq!(wake(1).as_deref(), Some("first"));
        assert_eq!(wake(2).as_deref(), Some("second"), "the first caller's return forgot the second failure");
        assert!(fs.state.lock().unwrap().failed.is_empty(), "failures outlived every caller they covered");
        // A new caller gets a sync of its own, not an old failure.
        fs.sync().unwrap();
        assert_eq!(fs.syncs(), 1);
    }

    #[test]
    fn ensure_dir_creates_the_missing_chain_and_nothing_else() {
        let root = tempfile::tempdir().unwrap();
        let leaf = root.path().join("a/b/c");
        ensure_dir(&leaf).unwrap();
        assert!(leaf.is_dir());
        ensure_dir(&leaf).unwrap();
        std::fs::write(root.path().join("file"), b"x").unwrap();
        let e = ensure_dir(&root.path().join("file/sub")).unwrap_err();
        assert!(matches!(e, DurableError::CreateDir { .. }), "{e}");
        assert!(e.to_string().contains("file"), "the message names the path: {e}");
    }

    #[test]
    fn write_new_replaces_atomically_and_leaves_no_temporary_file() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("x/y/chunk");
        write_new(&dest, |f| f.write_all(b"one")).unwrap();
        write_new(&dest, |f| f.write_all(b"two")).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"two");
        let failed = write_new(&dest, |f| {
            f.write_all(b"partial")?;
            Err::<(), _>(io::Error::other("source broke"))
        });
        assert!(failed.unwrap_err().to_string().contains("source broke"));
        assert_eq!(std::fs::read(&dest).unwrap(), b"two", "a failed write leaves the old file");
        let names: Vec<_> =
            std::fs::read_dir(dest.parent().unwrap()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("chunk")], "temporary files left behind");
    }

    #[test]
    fn rename_across_filesystems_is_reported_as_such() {
        // /dev/shm is a tmpfs on Linux; without it there is no second filesystem to try.
        let shm = Path::new("/dev/shm");
        let Ok(other) = tempfile::tempdir_in(shm) else {
            panic!("this test needs a writable /dev/shm (a tmpfs) to rename across filesystems");
        };
        let here = tempfile::tempdir().unwrap();
        use std::os::unix::fs::MetadataExt;
        let (a, b) = (std::fs::metadata(other.path()).unwrap().dev(), std::fs::metadata(here.path()).unwrap().dev());
        assert_ne!(a, b, "/dev/shm and the temporary directory are one filesystem; the test would prove nothing");
        let from = other.path().join("f");
        std::fs::write(&from, b"x").unwrap();
        let e = rename_into_place(&from, &here.path().join("d/f")).unwrap_err();
        assert!(e.is_cross_device(), "{e}");
    }

    #[test]
    fn temporary_names_are_told_from_keys() {
        let t = temp_path(Path::new("/s/jobs/j/chunks/ab/abcd"));
        assert!(is_temp_name(t.file_name().unwrap().to_str().unwrap()), "{t:?}");
        for key in ["abcd", "abcd.tmp", "00000000000000000001.json", ".tmp", ".", ".a.b.tmp", "..1-2.tmp", ".x.1-.tmp"]
        {
            assert!(!is_temp_name(key), "{key}");
        }
    }
}
