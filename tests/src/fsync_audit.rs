//! A power-loss audit from a syscall trace (`strace -f -y`): replays every file creation,
//! write, rename, link, mkdir and fsync of a process in order, keeping what a power cut would
//! lose — file bytes written since their last fsync, and directory entries created, renamed or
//! removed since their directory's last fsync — and checks, at the points where ckptd promises
//! durability, that nothing the promise covers is still volatile.
//!
//! The model is POSIX's, not ext4's: fsync of a file does not make its name durable; only an
//! fsync of the directory holding the name does. A page-cache-only SIGKILL test cannot see a
//! missing fsync; this audit can, and `tests/tests/power_loss.rs` shows it failing for each
//! fsync site switched off.
//!
//! Checkpoints:
//! * when a checkpoint root is created (renamed or linked to `jobs/<job>/manifests/<step>.json`):
//!   every chunk and index object in the store must be durable, bytes and every entry on its path;
//! * when a spilled chunk is first opened for reading (its upload; the spill file is the journal
//!   behind a `staged` ack): the spill file must be durable;
//! * at the end of the trace (ckptd SIGKILLed right after the last ack): every store object,
//!   roots included, and every root's or pin's removal (an acked delete or unpin).
//!
//! [`losses_at_end`] turns the same model into what a power cut at the end of the trace takes
//! back, and [`power_cut`] applies that to the directories ckptd left, so a test can start
//! ckptd again on what a disk would hold after the cut (`power_loss.rs`).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use ckpt_core::keys::{parse_key, ParsedKey};

/// One traced syscall that changes or syncs the file system.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Create {
        path: PathBuf,
        truncate: bool,
    },
    OpenRead(PathBuf),
    Write(PathBuf),
    Fsync(PathBuf),
    /// syncfs: every byte and entry on the filesystem holding this path (the fd's).
    SyncFs(PathBuf),
    Mkdir(PathBuf),
    Rename(PathBuf, PathBuf),
    Link(PathBuf, PathBuf),
    Unlink(PathBuf),
}

/// One whole call: its text, and the trace lines where it began and where it returned.
struct Call {
    text: String,
    began: usize,
    done: usize,
    /// The thread that made it (strace's `-f` prefix).
    thread: String,
}

/// Joins strace's `-f` continuation lines (`<unfinished ...>` / `<... x resumed>`) into whole
/// calls, in completion order. A call that never returned (its process was killed) comes last,
/// as done at the end: its effect may be on disk, never synced.
fn whole_calls(trace: &str) -> Vec<Call> {
    let mut pending: HashMap<&str, (String, usize)> = HashMap::new();
    let mut out = Vec::new();
    let mut at = 0;
    for (n, line) in trace.lines().enumerate() {
        at = n;
        let Some((pid, rest)) = line.split_once(' ') else { continue };
        let rest = rest.trim_start();
        if let Some(head) = rest.strip_suffix("<unfinished ...>") {
            pending.insert(pid, (head.to_string(), n));
        } else if rest.starts_with("<...") {
            let tail = rest.split_once("resumed>").map(|(_, t)| t).unwrap_or("");
            let (head, began) = pending.remove(pid).unwrap_or_default();
            out.push(Call { text: format!("{head}{tail}"), began, done: n, thread: pid.to_string() });
        } else {
            out.push(Call { text: rest.to_string(), began: n, done: n, thread: pid.to_string() });
        }
    }
    let mut cut: Vec<(&str, String, usize)> =
        pending.into_iter().map(|(pid, (head, began))| (pid, head, began)).collect();
    cut.sort_by_key(|(_, _, began)| *began);
    out.extend(cut.into_iter().map(|(pid, head, began)| Call {
        text: format!("{head}) = ?"),
        began,
        done: at + 1,
        thread: pid.to_string(),
    }));
    out
}

/// The quoted path arguments of a call, each resolved against the directory annotation
/// (`AT_FDCWD</cwd>` or `7</dir>`) that precedes it.
fn path_args(args: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut base: Option<PathBuf> = None;
    let mut rest = args;
    loop {
        let next_quote = rest.find('"');
        let next_angle = rest.find('<');
        match (next_quote, next_angle) {
            (Some(q), a) if a.is_none_or(|a| q < a) => {
                let after = &rest[q + 1..];
                let Some(end) = after.find('"') else { break };
                let s = &after[..end];
                let p = Path::new(s);
                out.push(if p.is_absolute() { p.to_path_buf() } else { base.clone().unwrap_or_default().join(p) });
                rest = &after[end + 1..];
            }
            (_, Some(a)) => {
                let after = &rest[a + 1..];
                let Some(end) = after.find('>') else { break };
                base = Some(PathBuf::from(&after[..end]));
                rest = &after[end + 1..];
            }
            _ => break,
        }
    }
    out
}

/// The path in the first fd annotation of `s` (`12</path>`), without a " (deleted)" suffix.
fn first_fd_path(s: &str) -> Option<PathBuf> {
    let start = s.find('<')? + 1;
    let end = start + s[start..].find('>')?;
    Some(PathBuf::from(s[start..end].trim_end_matches(" (deleted)")))
}

fn parse(call: &str) -> Option<Op> {
    let (name, rest) = call.split_once('(')?;
    // strace pads the return value with spaces: `mkdir("a", 0777)          = 0`.
    let (left, ret) = rest.rsplit_once(" = ")?;
    let args = left.trim_end().strip_suffix(')')?;
    if ret.trim_start().starts_with('-') {
        return None;
    }
    // `?`: the process was killed in the call. A change may have happened; a sync promises
    // nothing.
    if ret.trim_start().starts_with('?') && matches!(name, "fsync" | "fdatasync" | "syncfs") {
        return None;
    }
    match name {
        "open" | "openat" | "creat" => {
            // A call the kill cut short has no fd to name its file: the path argument does.
            let path = first_fd_path(ret).or_else(|| path_args(args).into_iter().next())?;
            if name == "creat" || args.contains("O_CREAT") {
                Some(Op::Create { path, truncate: args.contains("O_TRUNC") })
            } else if !args.contains("O_WRONLY") && !args.contains("O_RDWR") {
                Some(Op::OpenRead(path))
            } else {
                None
            }
        }
        "write" | "pwrite64" | "writev" | "pwritev" | "pwritev2" | "ftruncate" | "fallocate" => {
            first_fd_path(args).map(Op::Write)
        }
        "copy_file_range" => {
            // copy_file_range(in, off, out, ...): the second fd is the one written.
            let second = args.split_once(", ")?.1.split_once(", ")?.1;
            first_fd_path(second).map(Op::Write)
        }
        "fsync" | "fdatasync" => first_fd_path(args).map(Op::Fsync),
        "syncfs" => first_fd_path(args).map(Op::SyncFs),
        "mkdir" | "mkdirat" => path_args(args).into_iter().next().map(Op::Mkdir),
        "rename" | "renameat" | "renameat2" => {
            let p = path_args(args);
            (p.len() >= 2).then(|| Op::Rename(p[0].clone(), p[1].clone()))
        }
        "link" | "linkat" => {
            let p = path_args(args);
            (p.len() >= 2).then(|| Op::Link(p[0].clone(), p[1].clone()))
        }
        "unlink" | "unlinkat" | "rmdir" => path_args(args).into_iter().next().map(Op::Unlink),
        _ => None,
    }
}

/// What a power cut at this point of the trace would lose.
#[derive(Default)]
struct Volatile {
    inode_of: HashMap<PathBuf, u64>,
    next_inode: u64,
    /// Inodes with unsynced bytes, each with the trace line where its last change returned.
    dirty_data: HashMap<u64, usize>,
    /// Unsynced names per directory, each with the line where its last change returned.
    dirty_entries: HashMap<PathBuf, HashMap<std::ffi::OsString, usize>>,
    /// Names a rename replaced while they were durable: undoing it would bring back bytes the
    /// trace no longer has.
    replaced: HashSet<PathBuf>,
    /// The line where the call being applied returned.
    now: usize,
    /// Where a name now in use was renamed from (first source of a chain of renames).
    renamed_from: HashMap<PathBuf, PathBuf>,
    /// Names removed by an unlink (and not made again since).
    unlinked: HashSet<PathBuf>,
    /// Roots of filesystems other than the test directory's: a syncfs covers only its own.
    other_filesystems: Vec<PathBuf>,
}

/// Which filesystem `p` is on: the index of the listed root holding it, or `None` for the
/// test directory's own.
fn filesystem_of(others: &[PathBuf], p: &Path) -> Option<usize> {
    others.iter().position(|root| p.starts_with(root))
}

impl Volatile {
    fn filesystem(&self, p: &Path) -> Option<usize> {
        filesystem_of(&self.other_filesystems, p)
    }

    fn inode(&mut self, p: &Path) -> u64 {
        if let Some(i) = self.inode_of.get(p) {
            return *i;
        }
        self.next_inode += 1;
        self.inode_of.insert(p.to_path_buf(), self.next_inode);
        self.next_inode
    }

    fn is_dirty_name(&self, p: &Path) -> bool {
        match (p.parent(), p.file_name()) {
            (Some(dir), Some(name)) => self.dirty_entries.get(dir).is_some_and(|names| names.contains_key(name)),
            _ => false,
        }
    }

    fn touch_entry(&mut self, p: &Path) {
        if let (Some(dir), Some(name)) = (p.parent(), p.file_name()) {
            self.dirty_entries.entry(dir.to_path_buf()).or_default().insert(name.to_os_string(), self.now);
        }
    }

    fn touch_data(&mut self, i: u64) {
        self.dirty_data.insert(i, self.now);
    }

    /// Applies a call that began at trace line `began` and returned at `done`. A sync covers
    /// only changes that returned before it began: one that lands while it runs may miss it.
    fn apply(&mut self, op: &Op, began: usize, done: usize) {
        self.now = done;
        match op {
            Op::Create { path, truncate } => {
                if !self.inode_of.contains_key(path) {
                    self.renamed_from.remove(path);
                    self.replaced.remove(path);
                }
                self.unlinked.remove(path);
                if !self.inode_of.contains_key(path) || *truncate {
                    let i = self.inode(path);
                    if *truncate {
                        self.touch_data(i);
                    }
                }
                self.touch_entry(path);
            }
            Op::OpenRead(_) => {}
            Op::Write(p) => {
                let i = self.inode(p);
                self.touch_data(i);
            }
            Op::Fsync(p) => {
                // A directory's fsync makes its entries durable, a file's its bytes; the trace
                // names only the path, so both are applied (a file has no entries).
                if let Some(names) = self.dirty_entries.get_mut(p) {
                    names.retain(|_, changed| *changed >= began);
                }
                if let Some(i) = self.inode_of.get(p) {
                    if self.dirty_data.get(i).is_some_and(|changed| *changed < began) {
                        self.dirty_data.remove(i);
                    }
                }
            }
            Op::SyncFs(on) => {
                let fs = self.filesystem(on);
                for (dir, names) in self.dirty_entries.iter_mut() {
                    if filesystem_of(&self.other_filesystems, dir) == fs {
                        names.retain(|_, changed| *changed >= began);
                    }
                }
                let synced: Vec<u64> = self
                    .inode_of
                    .iter()
                    .filter(|(p, _)| filesystem_of(&self.other_filesystems, p) == fs)
                    .map(|(_, i)| *i)
                    .collect();
                for i in synced {
                    if self.dirty_data.get(&i).is_some_and(|changed| *changed < began) {
                        self.dirty_data.remove(&i);
                    }
                }
            }
            Op::Mkdir(p) => {
                self.renamed_from.remove(p);
                self.replaced.remove(p);
                self.unlinked.remove(p);
                self.touch_entry(p);
            }
            Op::Rename(a, b) => {
                // A name its directory has synced is where an undo would stop.
                let a_durable = !self.is_dirty_name(a);
                let origin = self.renamed_from.remove(a).filter(|_| !a_durable).unwrap_or_else(|| a.clone());
                self.replaced.remove(a);
                if self.inode_of.contains_key(b) && !self.is_dirty_name(b) {
                    self.replaced.insert(b.clone());
                }
                self.renamed_from.insert(b.clone(), origin);
                self.unlinked.remove(b);
                let i = self.inode(a);
                self.inode_of.remove(a);
                self.inode_of.insert(b.clone(), i);
                self.touch_entry(a);
                self.touch_entry(b);
            }
            Op::Link(a, b) => {
                self.renamed_from.remove(b);
                self.replaced.remove(b);
                self.unlinked.remove(b);
                let i = self.inode(a);
                self.inode_of.insert(b.clone(), i);
                self.touch_entry(b);
            }
            Op::Unlink(p) => {
                self.renamed_from.remove(p);
                self.replaced.remove(p);
                self.unlinked.insert(p.clone());
                self.inode_of.remove(p);
                self.touch_entry(p);
            }
        }
    }

    /// Why `path` would not survive a power cut now: unsynced bytes, or an unsynced entry on
    /// its path below `top`.
    fn why_volatile(&self, path: &Path, top: &Path) -> Option<String> {
        if self.inode_of.get(path).is_some_and(|i| self.dirty_data.contains_key(i)) {
            return Some(format!("bytes of {} not fsync'd", path.display()));
        }
        let mut p = path;
        while let (Some(dir), Some(name)) = (p.parent(), p.file_name()) {
            // Above the test's own directories the entries predate the traced process.
            if !dir.starts_with(top)
                && self.filesystem(dir).is_none_or(|f| !dir.starts_with(&self.other_filesystems[f]))
            {
                break;
            }
            if self.dirty_entries.get(dir).is_some_and(|d| d.contains_key(name)) {
                return Some(format!(
                    "entry {:?} in {} (on the path of {}) not fsync'd",
                    name,
                    dir.display(),
                    path.display()
                ));
            }
            p = dir;
        }
        None
    }

    /// Store objects (chunks and index objects; roots too with `roots`) that exist now.
    fn store_objects(&self, store: &Path, roots: bool) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = self
            .inode_of
            .keys()
            .filter(|p| {
                let Ok(rel) = p.strip_prefix(store) else { return false };
                match rel.to_str().and_then(parse_key) {
                    Some(ParsedKey::Manifest { .. }) => roots,
                    Some(_) => true,
                    None => false,
                }
            })
            .cloned()
            .collect();
        out.sort();
        out
    }
}

/// Where a traced run keeps things.
pub struct Layout<'a> {
    /// Bounds the directory chain checked (the test's own directory; what is above it predates
    /// the traced process).
    pub top: &'a Path,
    pub store: &'a Path,
    pub spill: &'a Path,
    /// Files here were written by other processes (clients) that never fsync them: their bytes
    /// count as volatile until the traced process syncs them.
    pub foreign: &'a Path,
    /// Directories on filesystems other than `top`'s (a syncfs makes only its own filesystem
    /// durable: a spill disk apart from the store is not covered by the store's group syncs).
    pub other_filesystems: &'a [&'a Path],
}

/// Everything the trace shows ckptd promising durable while it was not.
pub fn audit(trace: &str, layout: &Layout<'_>) -> Vec<String> {
    let Layout { top, store, spill, foreign, other_filesystems } = *layout;
    let mut v = Volatile {
        other_filesystems: other_filesystems.iter().map(|p| p.to_path_buf()).collect(),
        ..Volatile::default()
    };
    let mut violations = Vec::new();
    let mut checked_spill = HashSet::new();
    // The threads whose renames (or links) put each name in place, in order.
    let mut placed_by: HashMap<PathBuf, Vec<String>> = HashMap::new();
    let is_root = |p: &Path| {
        p.strip_prefix(store)
            .ok()
            .and_then(|r| r.to_str())
            .and_then(parse_key)
            .is_some_and(|k| matches!(k, ParsedKey::Manifest { .. }))
    };
    for call in whole_calls(trace) {
        let Some(op) = parse(&call.text) else { continue };
        if let Op::OpenRead(p) = &op {
            if p.starts_with(foreign) && !v.inode_of.contains_key(p) {
                let i = v.inode(p);
                v.now = call.done;
                v.touch_data(i);
            }
            let spilled = p.starts_with(spill) && p.file_name().is_some_and(|n| !n.to_string_lossy().starts_with('.'));
            if spilled && v.inode_of.contains_key(p) && checked_spill.insert(p.clone()) {
                if let Some(why) = v.why_volatile(p, top) {
                    violations.push(format!("spilled chunk read for upload while volatile: {why}"));
                }
            }
        }
        let creates_root = match &op {
            Op::Rename(_, b) | Op::Link(_, b) => is_root(b).then(|| b.clone()),
            _ => None,
        };
        v.apply(&op, call.began, call.done);
        if let Op::Rename(_, b) | Op::Link(_, b) = &op {
            placed_by.entry(b.clone()).or_default().push(call.thread.clone());
        }
        // An adopt that copies across filesystems removes the client's handoff file (named
        // `<hash>.<pid>.<seq>`) once its copy is durable: from then the store's copy is the
        // only one, and it was acked. So does an adopt that finds the chunk already stored.
        // Its copy is the one its own thread renamed into place, if any: a copy of the same
        // chunk that another adopt renamed over it since is that adopt's to make durable (and
        // is checked at that adopt's removal).
        if let Op::Unlink(p) = &op {
            let hash = p.starts_with(foreign).then(|| p.file_name()).flatten().and_then(|n| n.to_str());
            if let Some(hash) = hash.and_then(|n| n.split('.').next()) {
                let replaced_since = |c: &PathBuf| {
                    placed_by.get(c).is_some_and(|ts| ts.contains(&call.thread) && ts.last() != Some(&call.thread))
                };
                let its_copy = |c: &&PathBuf| c.file_name().is_some_and(|n| n == hash) && !replaced_since(c);
                for c in v.store_objects(store, false).iter().filter(its_copy) {
                    if let Some(why) = v.why_volatile(c, top) {
                        violations
                            .push(format!("handoff file {} removed while its copy is volatile: {why}", p.display()));
                    }
                }
            }
        }
        if let Some(root) = creates_root {
            for p in v.store_objects(store, false) {
                if let Some(why) = v.why_volatile(&p, top) {
                    violations.push(format!("root {} created while {why}", root.display()));
                }
            }
        }
    }
    for p in v.store_objects(store, true) {
        if let Some(why) = v.why_volatile(&p, top) {
            violations.push(format!("at the end (after the last ack): {why}"));
        }
    }
    // A deleted root must stay deleted: one a cut brings back may name objects GC swept. So
    // must an unpin: a pin a cut brings back keeps its checkpoint from retention for good.
    let is_pin = |p: &Path| {
        p.strip_prefix(store).ok().and_then(|r| r.to_str()).is_some_and(|k| {
            k.rsplit_once('/').is_some_and(|(dir, _)| dir.ends_with("/pins"))
                && ckpt_core::keys::parse_pin_key(k).is_some()
        })
    };
    let mut removed: Vec<&PathBuf> =
        v.unlinked.iter().filter(|p| (is_root(p) || is_pin(p)) && v.is_dirty_name(p)).collect();
    removed.sort();
    for p in removed {
        let what = if is_root(p) { "root" } else { "pin" };
        violations.push(format!("at the end (after the last ack): removal of {what} {} not fsync'd", p.display()));
    }
    violations
}

/// One thing a power cut at the end of a trace takes back, by the audit's model.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Loss {
    /// The file's bytes written since its last fsync.
    Bytes(PathBuf),
    /// A name (file or directory) made since its directory's last fsync.
    Name(PathBuf),
    /// A rename neither directory has synced since: the file is back under its first name.
    Renamed { from: PathBuf, to: PathBuf },
    /// A removal not synced since: the name would come back, but its bytes are no longer in
    /// what the process left, so [`power_cut`] brings it back only when told its bytes.
    Unlinked(PathBuf),
    /// A rename over a durable name not synced since: the old file would be back under it,
    /// and its bytes are gone too (reported, not applied).
    Replaced(PathBuf),
}

/// What a power cut right after the last traced call takes back (sorted). `other_filesystems`
/// as in [`Layout`].
pub fn losses_at_end(trace: &str, other_filesystems: &[&Path]) -> Vec<Loss> {
    let mut v = Volatile {
        other_filesystems: other_filesystems.iter().map(|p| p.to_path_buf()).collect(),
        ..Volatile::default()
    };
    for call in whole_calls(trace) {
        if let Some(op) = parse(&call.text) {
            v.apply(&op, call.began, call.done);
        }
    }
    let mut out: Vec<Loss> =
        v.inode_of.iter().filter(|(_, i)| v.dirty_data.contains_key(i)).map(|(p, _)| Loss::Bytes(p.clone())).collect();
    for (dir, names) in &v.dirty_entries {
        for name in names.keys() {
            let p = dir.join(name);
            let loss = match v.renamed_from.get(&p) {
                _ if v.replaced.contains(&p) => Loss::Replaced(p),
                Some(from) if v.is_dirty_name(from) => Loss::Renamed { from: from.clone(), to: p },
                _ if v.unlinked.contains(&p) => Loss::Unlinked(p),
                // A rename's source whose destination is durable: the file lives on there.
                _ if v.renamed_from.values().any(|from| *from == p) => continue,
                _ => Loss::Name(p),
            };
            out.push(loss);
        }
    }
    out.sort();
    out
}

/// Applies `losses` to the directories a killed process left, as a disk would hold them after
/// the cut: a file with unsynced bytes is emptied, zero-filled at its length or cut to half
/// (seeded: the three outcomes file systems show), an unsynced name is removed (a directory
/// with all below it), an unsynced rename is undone, and an unsynced removal of a file whose
/// bytes `removed` holds is undone. Paths under `keep` are left as they are. Returns a line
/// per change made (and per loss it could not apply).
pub fn power_cut(losses: &[Loss], keep: &[&Path], removed: &HashMap<PathBuf, Vec<u8>>, seed: u64) -> Vec<String> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let kept = |p: &Path| keep.iter().any(|k| p.starts_with(k));
    let mut done = Vec::new();
    for loss in losses {
        let Loss::Bytes(p) = loss else { continue };
        let Ok(len) = std::fs::metadata(p).map(|m| m.len()) else { continue };
        if kept(p) || !p.is_file() {
            continue;
        }
        let f = std::fs::OpenOptions::new().write(true).open(p).expect("open a file to cut");
        let how = match rng.random_range(0..3) {
            0 => {
                f.set_len(0).unwrap();
                "emptied"
            }
            1 => {
                f.set_len(0).unwrap();
                f.set_len(len).unwrap();
                "zero-filled"
            }
            _ => {
                f.set_len(len / 2).unwrap();
                "cut to half"
            }
        };
        done.push(format!("{how} ({len} bytes): {}", p.display()));
    }
    // Deepest first, so a rename inside a lost directory is undone before the directory goes.
    let mut names: Vec<&Loss> = losses.iter().filter(|l| !matches!(l, Loss::Bytes(_))).collect();
    let depth = |l: &Loss| match l {
        Loss::Name(p) | Loss::Unlinked(p) | Loss::Replaced(p) | Loss::Renamed { to: p, .. } | Loss::Bytes(p) => {
            p.components().count()
        }
    };
    names.sort_by_key(|l| std::cmp::Reverse(depth(l)));
    for loss in names {
        match loss {
            Loss::Name(p) if !kept(p) => {
                if !remove(p) {
                    continue;
                }
                done.push(format!("name removed: {}", p.display()));
            }
            Loss::Renamed { from, to } if !kept(to) => {
                if std::fs::symlink_metadata(to).is_err() {
                    continue;
                }
                if from.parent().is_some_and(|d| d.is_dir()) {
                    std::fs::rename(to, from).unwrap();
                    done.push(format!("rename undone: {} is {} again", to.display(), from.display()));
                } else {
                    remove(to);
                    done.push(format!("name removed (its first directory is gone): {}", to.display()));
                }
            }
            Loss::Unlinked(p) if !kept(p) => match removed.get(p) {
                Some(bytes) if p.parent().is_some_and(|d| d.is_dir()) && std::fs::symlink_metadata(p).is_err() => {
                    std::fs::write(p, bytes).unwrap();
                    done.push(format!("removal undone: {} is back", p.display()));
                }
                _ => done.push(format!("not applied, its bytes are gone: removal of {}", p.display())),
            },
            Loss::Replaced(p) if !kept(p) => {
                done.push(format!("not applied, the replaced bytes are gone: rename over {}", p.display()))
            }
            _ => {}
        }
    }
    done
}

/// Removes a file or a directory with all below it; false when there was nothing there.
fn remove(p: &Path) -> bool {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p).unwrap(),
        Ok(_) => std::fs::remove_file(p).unwrap(),
        Err(_) => return false,
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOP: &str = "/t";

    fn run(trace: &str) -> Vec<String> {
        let layout = Layout {
            top: Path::new(TOP),
            store: Path::new("/t/store"),
            spill: Path::new("/t/state/spill"),
            foreign: Path::new("/t/state/handoff"),
            other_filesystems: &[Path::new("/shm")],
        };
        audit(trace, &layout)
    }

    const HASH: &str = "aa00000000000000000000000000000000000000000000000000000000000000";

    fn chunk_put(fsync_file: bool, fsync_dir: bool) -> String {
        let dest = format!("/t/store/jobs/j/chunks/aa/{HASH}");
        let mut t = String::new();
        t += "1 mkdir(\"/t/store/jobs/j/chunks/aa\", 0777) = 0\n";
        t += "1 openat(AT_FDCWD</t>, \"/t/store/jobs/j/chunks/aa\", O_RDONLY|O_DIRECTORY) = 4</t/store/jobs/j/chunks/aa>\n";
        t += "1 fsync(4</t/store/jobs/j/chunks/aa>) = 0\n";
        t += "1 openat(AT_FDCWD</t>, \"/t/store/jobs/j/chunks\", O_RDONLY|O_DIRECTORY) = 5</t/store/jobs/j/chunks>\n";
        t += "1 fsync(5</t/store/jobs/j/chunks>) = 0\n";
        t += &format!("1 openat(AT_FDCWD</t>, \"{dest}#1\", O_WRONLY|O_CREAT|O_EXCL, 0666) = 6<{dest}#1>\n");
        t += &format!("1 write(6<{dest}#1>, \"abc\", 3) = 3\n");
        if fsync_file {
            t += &format!("2 fsync(6<{dest}#1> <unfinished ...>\n1 getpid() = 1\n2 <... fsync resumed>) = 0\n");
        }
        t += &format!("1 rename(\"{dest}#1\", \"{dest}\") = 0\n");
        if fsync_dir {
            t += "1 fsync(4</t/store/jobs/j/chunks/aa>) = 0\n";
        }
        t += "1 linkat(AT_FDCWD</t>, \"/t/store/jobs/j/manifests/00000000000000000001.json#2\", AT_FDCWD</t>, \"/t/store/jobs/j/manifests/00000000000000000001.json\", 0) = 0\n";
        t
    }

    #[test]
    fn a_fully_synced_put_passes_and_each_missing_sync_is_named() {
        // The root itself was never written or synced in this small trace: only the end check
        // names it, not the chunk.
        let ok = run(&chunk_put(true, true));
        assert!(ok.iter().all(|v| v.contains("manifests")), "{ok:?}");
        let no_file = run(&chunk_put(false, true));
        assert!(no_file.iter().any(|v| v.contains("bytes of") && v.contains("chunks/aa")), "{no_file:?}");
        let no_dir = run(&chunk_put(true, false));
        assert!(no_dir.iter().any(|v| v.starts_with("root") && v.contains("entry")), "{no_dir:?}");
    }

    #[test]
    fn a_handoff_file_removed_before_its_copy_is_durable_is_named() {
        // A copy into a new chunk directory, file synced; then the handoff file's removal.
        let dest = format!("/t/store/jobs/j/chunks/aa/{HASH}");
        let handoff = format!("/t/state/handoff/{HASH}.7.0");
        let mut t = String::new();
        t += "1 mkdir(\"/t/store/jobs/j/chunks/aa\", 0777) = 0\n";
        t += &format!("1 openat(AT_FDCWD</t>, \"{dest}#1\", O_WRONLY|O_CREAT|O_EXCL, 0666) = 6<{dest}#1>\n");
        t += &format!("1 write(6<{dest}#1>, \"abc\", 3) = 3\n1 fsync(6<{dest}#1>) = 0\n");
        t += &format!("1 rename(\"{dest}#1\", \"{dest}\") = 0\n");
        t += "1 openat(AT_FDCWD</t>, \"/t/store/jobs/j/chunks/aa\", O_RDONLY|O_DIRECTORY) = 4</t/store/jobs/j/chunks/aa>\n";
        t += "1 fsync(4</t/store/jobs/j/chunks/aa>) = 0\n";
        let synced_parent = "1 openat(AT_FDCWD</t>, \"/t/store/jobs/j/chunks\", O_RDONLY|O_DIRECTORY) = 5</t/store/jobs/j/chunks>\n1 fsync(5</t/store/jobs/j/chunks>) = 0\n";
        let unlink = format!("1 unlink(\"{handoff}\") = 0\n");
        // The new directory's own entry (in `chunks/`) was never synced: the removal is early.
        let found = run(&(t.clone() + &unlink));
        assert!(
            found.iter().any(|f| f.starts_with("handoff file") && f.contains("entry") && f.contains("chunks/aa")),
            "{found:?}"
        );
        // Synced first: nothing to name (and a later syncfs does not excuse an early removal).
        assert!(run(&(t.clone() + synced_parent + &unlink)).is_empty());
        let late = run(&(t + &unlink + "1 syncfs(9</t/store>) = 0\n"));
        assert!(late.iter().any(|f| f.starts_with("handoff file")), "{late:?}");
    }

    #[test]
    fn a_copy_another_adopt_renamed_over_is_that_adopts_to_sync() {
        // Two adopts of one chunk, threads 1 and 2: 2's rename lands while 1's directory fsync
        // runs, so the entry is dirty when 1 removes its handoff file; 1's own copy was made
        // durable, and 2's is checked at 2's removal.
        let dest = format!("/t/store/jobs/j/chunks/aa/{HASH}");
        let dir = "/t/store/jobs/j/chunks/aa";
        let mut t = String::new();
        t += &format!("1 mkdir(\"{dir}\", 0777) = 0\n");
        t += "1 openat(AT_FDCWD</t>, \"/t/store/jobs/j/chunks\", O_RDONLY|O_DIRECTORY) = 5</t/store/jobs/j/chunks>\n1 fsync(5</t/store/jobs/j/chunks>) = 0\n";
        for th in ["1", "2"] {
            t += &format!(
                "{th} openat(AT_FDCWD</t>, \"{dest}#{th}\", O_WRONLY|O_CREAT|O_EXCL, 0666) = 6<{dest}#{th}>\n"
            );
            t += &format!("{th} write(6<{dest}#{th}>, \"abc\", 3) = 3\n{th} fsync(6<{dest}#{th}>) = 0\n");
        }
        t += &format!("1 rename(\"{dest}#1\", \"{dest}\") = 0\n");
        t += &format!("1 openat(AT_FDCWD</t>, \"{dir}\", O_RDONLY|O_DIRECTORY) = 4<{dir}>\n");
        t += &format!("1 fsync(4<{dir}> <unfinished ...>\n");
        t += &format!("2 rename(\"{dest}#2\", \"{dest}\") = 0\n");
        t += "1 <... fsync resumed>) = 0\n";
        t += &format!("1 unlink(\"/t/state/handoff/{HASH}.7.0\") = 0\n");
        assert!(run(&t).iter().all(|f| !f.starts_with("handoff file")), "{:?}", run(&t));
        // 2 removes its handoff file with no directory fsync of its own: named.
        let early = run(&(t.clone() + &format!("2 unlink(\"/t/state/handoff/{HASH}.7.1\") = 0\n")));
        assert!(early.iter().any(|f| f.starts_with("handoff file") && f.contains(".7.1")), "{early:?}");
        // A third adopt finds the chunk stored and removes its handoff file while 2's rename is
        // still unsynced: it placed no copy, so the stored one is checked.
        let third = run(&(t.clone() + &format!("3 unlink(\"/t/state/handoff/{HASH}.7.2\") = 0\n")));
        assert!(third.iter().any(|f| f.starts_with("handoff file") && f.contains(".7.2")), "{third:?}");
        let synced = t + &format!("2 fsync(4<{dir}>) = 0\n2 unlink(\"/t/state/handoff/{HASH}.7.1\") = 0\n");
        assert!(run(&synced).is_empty(), "{:?}", run(&synced));
    }

    #[test]
    fn a_syncfs_covers_its_own_filesystem_only() {
        let spill = format!("/shm/spill/j/{HASH}");
        let mut t = String::new();
        t += &format!("1 openat(AT_FDCWD</t>, \"{spill}\", O_WRONLY|O_CREAT|O_TRUNC, 0666) = 6<{spill}>\n");
        t += &format!("1 write(6<{spill}>, \"abc\", 3) = 3\n");
        t += "1 syncfs(9</t/store>) = 0\n";
        t += &format!("1 openat(AT_FDCWD</t>, \"{spill}\", O_RDONLY) = 7<{spill}>\n");
        let layout = Layout {
            top: Path::new(TOP),
            store: Path::new("/t/store"),
            spill: Path::new("/shm/spill"),
            foreign: Path::new("/t/state/handoff"),
            other_filesystems: &[Path::new("/shm")],
        };
        let found = audit(&t, &layout);
        assert!(found.iter().any(|v| v.contains("spilled chunk") && v.contains("bytes of")), "{found:?}");
        let same_fs = t.replace("syncfs(9</t/store>)", "syncfs(9</shm>)");
        assert!(audit(&same_fs, &layout).is_empty(), "a syncfs of the spill's own filesystem covers it");
    }

    #[test]
    fn a_root_removal_must_be_synced_by_the_end() {
        let root = "/t/store/jobs/j/manifests/00000000000000000001.json";
        let t = format!("1 unlink(\"{root}\") = 0\n");
        let found = run(&t);
        assert!(found.iter().any(|f| f.contains("removal of root") && f.contains(root)), "{found:?}");
        let synced = t + "1 openat(AT_FDCWD</t>, \"/t/store/jobs/j/manifests\", O_RDONLY|O_DIRECTORY) = 4</t/store/jobs/j/manifests>\n1 fsync(4</t/store/jobs/j/manifests>) = 0\n";
        assert!(run(&synced).is_empty(), "{:?}", run(&synced));
    }

    #[test]
    fn a_cut_takes_back_unsynced_bytes_names_and_renames_and_nothing_synced() {
        let mut t = String::new();
        // Synced whole: stays.
        t += "1 openat(AT_FDCWD</t>, \"/t/d/kept\", O_WRONLY|O_CREAT, 0666) = 3</t/d/kept>\n";
        t += "1 write(3</t/d/kept>, \"\", 9) = 9\n1 fsync(3</t/d/kept>) = 0\n";
        // Written, renamed, file synced but not the directory: the rename is undone.
        t += "1 openat(AT_FDCWD</t>, \"/t/d/a.tmp\", O_WRONLY|O_CREAT, 0666) = 4</t/d/a.tmp>\n";
        t += "1 write(4</t/d/a.tmp>, \"\", 9) = 9\n1 fsync(4</t/d/a.tmp>) = 0\n";
        t += "1 rename(\"/t/d/a.tmp\", \"/t/d/a\") = 0\n";
        t += "1 openat(AT_FDCWD</t>, \"/t/d\", O_RDONLY|O_DIRECTORY) = 5</t/d>\n1 fsync(5</t/d>) = 0\n";
        t += "1 rename(\"/t/d/a\", \"/t/e\") = 0\n";
        // A new file never synced, in a new directory; and an unsynced removal.
        t += "1 mkdir(\"/t/n\", 0777) = 0\n";
        t += "1 openat(AT_FDCWD</t>, \"/t/n/x\", O_WRONLY|O_CREAT|O_TRUNC, 0666) = 6</t/n/x>\n";
        t += "1 write(6</t/n/x>, \"\", 4) = 4\n";
        t += "1 unlink(\"/t/d/kept\") = 0\n";
        let lost = losses_at_end(&t, &[]);
        // /t/e came from /t/d/a (the first name that /t/d's fsync made durable).
        assert!(lost.contains(&Loss::Renamed { from: "/t/d/a".into(), to: "/t/e".into() }), "{lost:?}");
        assert!(lost.contains(&Loss::Name("/t/n".into())) && lost.contains(&Loss::Bytes("/t/n/x".into())), "{lost:?}");
        assert!(lost.contains(&Loss::Unlinked("/t/d/kept".into())), "{lost:?}");
        assert!(!lost.iter().any(|l| matches!(l, Loss::Bytes(p) if p.ends_with("e") || p.ends_with("a"))), "{lost:?}");

        // Applied to real directories (the trace's paths under a temporary top).
        let dir = tempfile::tempdir().unwrap();
        let top = dir.path();
        let at = |p: &str| top.join(p.trim_start_matches("/t/"));
        std::fs::create_dir_all(at("/t/d")).unwrap();
        std::fs::create_dir_all(at("/t/n")).unwrap();
        std::fs::create_dir_all(at("/t/k")).unwrap();
        std::fs::write(at("/t/e"), b"123456789").unwrap();
        std::fs::write(at("/t/n/x"), b"abcd").unwrap();
        std::fs::write(at("/t/k/y"), b"abcd").unwrap();
        let moved: Vec<Loss> = lost
            .iter()
            .map(|l| match l {
                Loss::Bytes(p) => Loss::Bytes(at(p.to_str().unwrap())),
                Loss::Name(p) => Loss::Name(at(p.to_str().unwrap())),
                Loss::Unlinked(p) => Loss::Unlinked(at(p.to_str().unwrap())),
                Loss::Replaced(p) => Loss::Replaced(at(p.to_str().unwrap())),
                Loss::Renamed { from, to } => {
                    Loss::Renamed { from: at(from.to_str().unwrap()), to: at(to.to_str().unwrap()) }
                }
            })
            .chain([Loss::Bytes(at("/t/k/y")), Loss::Name(at("/t/k"))])
            .collect();
        // The removed file's bytes are known (as a test knows a root it deleted).
        let removed = HashMap::from([(at("/t/d/kept"), b"kept-bytes".to_vec())]);
        let done = power_cut(&moved, &[&at("/t/k")], &removed, 7);
        assert_eq!(std::fs::read(at("/t/d/a")).unwrap(), b"123456789", "{done:?}");
        assert!(!at("/t/e").exists() && !at("/t/n").exists(), "{done:?}");
        assert_eq!(std::fs::read(at("/t/k/y")).unwrap(), b"abcd", "a kept path is left alone: {done:?}");
        assert_eq!(std::fs::read(at("/t/d/kept")).unwrap(), b"kept-bytes", "the removal is undone: {done:?}");
    }

    #[test]
    fn a_sync_covers_only_what_returned_before_it_began_and_a_killed_call_counts_as_done() {
        let x = format!("/t/store/jobs/j/chunks/aa/{HASH}");
        let root = "/t/store/jobs/j/manifests/00000000000000000001.json";
        let mut head = format!("1 openat(AT_FDCWD</t>, \"{x}\", O_WRONLY|O_CREAT, 0666) = 6<{x}>\n");
        head += "1 openat(AT_FDCWD</t>, \"/t/store\", O_RDONLY|O_DIRECTORY) = 9</t/store>\n";
        head += "1 syncfs(9</t/store>) = 0\n";
        let write = format!("1 write(6<{x}>, \"\", 3) = 3\n");
        let link = format!("1 linkat(AT_FDCWD</t>, \"{root}.tmp\", AT_FDCWD</t>, \"{root}\", 0) = 0\n");
        // The write returns while a syncfs runs: that syncfs may have missed it.
        let during = format!("{head}2 syncfs(9</t/store> <unfinished ...>\n{write}2 <... syncfs resumed>) = 0\n{link}");
        let found = run(&during);
        assert!(found.iter().any(|f| f.starts_with("root") && f.contains("bytes of") && f.contains(&x)), "{found:?}");
        // The write returns before the syncfs begins: covered.
        let before = format!("{head}{write}2 syncfs(9</t/store>) = 0\n{link}");
        let found = run(&before);
        assert!(!found.iter().any(|f| f.starts_with("root")), "{found:?}");
        // A write the kill cut short may be on disk, unsynced; a sync it cut short syncs nothing.
        let cut = format!("{head}1 write(6<{x}>, \"\", 3 <unfinished ...>\n");
        assert!(losses_at_end(&cut, &[]).contains(&Loss::Bytes(x.clone().into())));
        let cut_sync = format!("{head}{write}2 fsync(6<{x}> <unfinished ...>\n");
        assert!(losses_at_end(&cut_sync, &[]).contains(&Loss::Bytes(x.clone().into())));
        let cut_create = format!("{head}1 openat(AT_FDCWD</t>, \"/t/new\", O_WRONLY|O_CREAT, 0666 <unfinished ...>\n");
        assert!(losses_at_end(&cut_create, &[]).contains(&Loss::Name("/t/new".into())));
        // A rename over a durable name: the old bytes are gone, so it is reported, not undone.
        let over = format!(
            "{head}1 openat(AT_FDCWD</t>, \"/t/r.tmp\", O_WRONLY|O_CREAT, 0666) = 7</t/r.tmp>\n1 rename(\"/t/r.tmp\", \"{x}\") = 0\n"
        );
        assert!(
            losses_at_end(&over, &[]).contains(&Loss::Replaced(x.clone().into())),
            "{:?}",
            losses_at_end(&over, &[])
        );
    }

    #[test]
    fn failed_calls_change_nothing_and_relative_paths_resolve() {
        assert_eq!(parse("mkdir(\"/t/x\", 0777) = -1 EEXIST (File exists)"), None);
        assert_eq!(
            parse("renameat2(5</t/d>, \"a\", AT_FDCWD</t>, \"/t/b\", RENAME_NOREPLACE) = 0"),
            Some(Op::Rename("/t/d/a".into(), "/t/b".into()))
        );
        assert_eq!(parse("fsync(7</t/d/x (deleted)>) = 0"), Some(Op::Fsync("/t/d/x".into())));
        assert_eq!(parse("syncfs(9</t/store>) = 0"), Some(Op::SyncFs("/t/store".into())));
        assert_eq!(parse("syncfs(9</t/store>) = -1 EIO (Input/output error)"), None, "a failed syncfs syncs nothing");
        assert_eq!(parse("mkdir(\"/t/a\", 0777)          = 0"), Some(Op::Mkdir("/t/a".into())));
    }
}
