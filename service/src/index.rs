//! The local index and journal, in sled.
//!
//! Design note.
//! * What it holds: which chunks of each job are known durable, a copy of every committed
//!   manifest (for listings and fast reads), and the journal of in-flight saves.
//! * Consistency: the object store is the source of truth; this index is a cache of it plus the
//!   journal. Chunks are recorded only after their put returned; manifests only after their
//!   create returned. A chunk the index does not know is looked up in the store before anyone
//!   is told it is missing, so a lagging index costs a re-check, never a wrong answer.
//! * Crash consistency: sled syncs in the background, so the journal is flushed before a request
//!   that changed it is acked. Chunk records are not flushed per put (the store answers for
//!   them after a crash). On start, `Coordinator::recover` reconciles the index with the store:
//!   a missing or foreign index is rebuilt from the store's listings.
//! * All methods block; async callers run them on blocking threads.

use std::path::Path;

use ckpt_core::{ChunkHash, SaveState};

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("index: {0}")]
    Sled(#[from] sled::Error),
    #[error("index entry {key} is damaged: {reason}")]
    Damaged { key: String, reason: String },
}

#[derive(Clone)]
pub struct Index {
    db: sled::Db,
    chunks: sled::Tree,
    manifests: sled::Tree,
    saves: sled::Tree,
}

const STORE_KEY: &[u8] = b"store";

fn job_key(job: &str, suffix: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(job.len() + 1 + suffix.len());
    k.extend_from_slice(job.as_bytes());
    k.push(0);
    k.extend_from_slice(suffix);
    k
}

fn job_prefix(job: &str) -> Vec<u8> {
    job_key(job, &[])
}

fn split_step_key(key: &[u8]) -> Option<(String, u64)> {
    let nul = key.iter().position(|&b| b == 0)?;
    let job = std::str::from_utf8(&key[..nul]).ok()?.to_string();
    let step: [u8; 8] = key[nul + 1..].try_into().ok()?;
    Some((job, u64::from_be_bytes(step)))
}

impl Index {
    pub fn open(dir: &Path) -> Result<Index, IndexError> {
        let db = sled::Config::new().path(dir).open()?;
        Ok(Index {
            chunks: db.open_tree("chunks")?,
            manifests: db.open_tree("manifests")?,
            saves: db.open_tree("saves")?,
            db,
        })
    }

    pub async fn flush(&self) -> Result<(), IndexError> {
        self.db.flush_async().await?;
        Ok(())
    }

    /// The store this index describes, if it was ever reconciled with one.
    pub fn store_description(&self) -> Result<Option<String>, IndexError> {
        Ok(self.db.get(STORE_KEY)?.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    pub fn set_store_description(&self, d: &str) -> Result<(), IndexError> {
        self.db.insert(STORE_KEY, d.as_bytes())?;
        Ok(())
    }

    /// Forgets everything; used before a rebuild from the store.
    pub fn clear(&self) -> Result<(), IndexError> {
        self.chunks.clear()?;
        self.manifests.clear()?;
        self.saves.clear()?;
        self.db.remove(STORE_KEY)?;
        Ok(())
    }

    pub fn has_chunk(&self, job: &str, hash: &ChunkHash) -> Result<bool, IndexError> {
        Ok(self.chunks.contains_key(job_key(job, &hash.0))?)
    }

    pub fn put_chunk(&self, job: &str, hash: &ChunkHash, stored_len: u64) -> Result<(), IndexError> {
        self.chunks.insert(job_key(job, &hash.0), &stored_len.to_le_bytes())?;
        Ok(())
    }

    pub fn chunk_count(&self, job: &str) -> usize {
        self.chunks.scan_prefix(job_prefix(job)).count()
    }

    pub fn put_manifest(&self, job: &str, step: u64, bytes: &[u8]) -> Result<(), IndexError> {
        self.manifests.insert(job_key(job, &step.to_be_bytes()), bytes)?;
        Ok(())
    }

    pub fn get_manifest(&self, job: &str, step: u64) -> Result<Option<Vec<u8>>, IndexError> {
        Ok(self.manifests.get(job_key(job, &step.to_be_bytes()))?.map(|v| v.to_vec()))
    }

    pub fn remove_manifest(&self, job: &str, step: u64) -> Result<(), IndexError> {
        self.manifests.remove(job_key(job, &step.to_be_bytes()))?;
        Ok(())
    }

    /// Committed steps of a job, ascending (keys are big-endian, so sled's order is step order).
    pub fn manifest_steps(&self, job: &str) -> Result<Vec<u64>, IndexError> {
        let mut steps = Vec::new();
        for kv in self.manifests.scan_prefix(job_prefix(job)) {
            let (k, _) = kv?;
            if let Some((_, step)) = split_step_key(&k) {
                steps.push(step);
            }
        }
        Ok(steps)
    }

    /// Every (job, step) with a manifest in the index.
    pub fn all_manifests(&self) -> Result<Vec<(String, u64)>, IndexError> {
        let mut out = Vec::new();
        for kv in self.manifests.iter() {
            let (k, _) = kv?;
            if let Some(js) = split_step_key(&k) {
                out.push(js);
            }
        }
        Ok(out)
    }

    pub fn jobs(&self) -> Result<Vec<String>, IndexError> {
        let mut jobs = std::collections::BTreeSet::new();
        for tree in [&self.manifests, &self.saves] {
            for kv in tree.iter() {
                let (k, _) = kv?;
                if let Some((job, _)) = split_step_key(&k) {
                    jobs.insert(job);
                }
            }
        }
        Ok(jobs.into_iter().collect())
    }

    pub fn put_save(&self, save: &SaveState) -> Result<(), IndexError> {
        let bytes = serde_json::to_vec(save)
            .map_err(|e| IndexError::Damaged { key: format!("{}@{}", save.job, save.step), reason: e.to_string() })?;
        self.saves.insert(job_key(&save.job, &save.step.to_be_bytes()), bytes)?;
        Ok(())
    }

    pub fn remove_save(&self, job: &str, step: u64) -> Result<(), IndexError> {
        self.saves.remove(job_key(job, &step.to_be_bytes()))?;
        Ok(())
    }

    pub fn get_save(&self, job: &str, step: u64) -> Result<Option<SaveState>, IndexError> {
        match self.saves.get(job_key(job, &step.to_be_bytes()))? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| IndexError::Damaged { key: format!("{job}@{step}"), reason: e.to_string() }),
        }
    }

    pub fn all_saves(&self) -> Result<Vec<SaveState>, IndexError> {
        let mut out = Vec::new();
        for kv in self.saves.iter() {
            let (k, v) = kv?;
            let save: SaveState = serde_json::from_slice(&v).map_err(|e| IndexError::Damaged {
                key: String::from_utf8_lossy(&k).into_owned(),
                reason: e.to_string(),
            })?;
            out.push(save);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_reopen_and_orders_steps() {
        let dir = tempfile::tempdir().unwrap();
        let h = ChunkHash::of(b"a");
        {
            let idx = Index::open(dir.path()).unwrap();
            idx.put_chunk("j", &h, 10).unwrap();
            for step in [300u64, 2, 10] {
                idx.put_manifest("j", step, b"{}").unwrap();
            }
            idx.put_manifest("j2", 1, b"{}").unwrap();
            idx.db.flush().unwrap();
        }
        let idx = Index::open(dir.path()).unwrap();
        assert!(idx.has_chunk("j", &h).unwrap());
        assert!(!idx.has_chunk("j2", &h).unwrap(), "chunks are per job");
        assert_eq!(idx.manifest_steps("j").unwrap(), vec![2, 10, 300]);
        assert_eq!(idx.jobs().unwrap(), vec!["j".to_string(), "j2".to_string()]);
        idx.clear().unwrap();
        assert!(idx.all_manifests().unwrap().is_empty());
    }
}
