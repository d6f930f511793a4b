use ckpt_core::{ChunkHash, CoreError};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach ckptd at {url}: {}", root_cause(source))]
    Transport { url: String, source: reqwest::Error },
    #[error("{url:?} is not a ckptd URL: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("ckptd answered {status} {code}: {message}")]
    Api { status: u16, code: String, message: String },
    #[error("chunk {hash} of checkpoint {job}@{step} is corrupt: {reason}")]
    CorruptChunk { job: String, step: u64, hash: ChunkHash, reason: String },
    #[error("manifest of checkpoint {job}@{step} is corrupt: {reason}")]
    CorruptManifest { job: String, step: u64, reason: String },
    #[error("save {job}@{step} was aborted: {reason}")]
    Aborted { job: String, step: u64, reason: String },
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("rank {rank} is not in checkpoint {job}@{step} (world size {world_size})")]
    NoSuchRank { job: String, step: u64, rank: u32, world_size: u32 },
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error("invalid tensor {name:?}: {reason}")]
    InvalidTensor { name: String, reason: String },
    #[error("unexpected answer from ckptd: {0}")]
    Protocol(String),
    #[error("local ckptd: {0}")]
    Daemon(String),
    /// Credentials or TLS files the client was given cannot be used.
    #[error("client configuration: {0}")]
    Config(String),
    #[error("internal: {0}")]
    Internal(String),
}

impl ClientError {
    /// Worth retrying the same request: ckptd unreachable, busy, or failing transiently. A 408
    /// means ckptd dropped a request whose body stopped arriving (a rank stopped mid-upload and
    /// resumed): sending it again is the cure.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Transport { .. } => true,
            // A hash mismatch on a chunk the client hashed itself means the bytes changed on
            // the way (a faulty NIC or proxy): sending them again is the cure.
            ClientError::Api { status, code, .. } => {
                matches!(status, 408 | 502..=504)
                    || code == "hash_mismatch"
                    || code == "body_mismatch"
                    || code == "rate_limited"
            }
            _ => false,
        }
    }

    /// Nothing answered: the connection was refused or could not be opened in time (a request
    /// that timed out on a live connection is not this).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ClientError::Transport { source, .. } if source.is_connect())
    }

    /// The request timed out on an open connection: ckptd took it and did not answer in time.
    pub fn is_timeout(&self) -> bool {
        matches!(self, ClientError::Transport { source, .. } if source.is_timeout() && !source.is_connect())
    }

    pub fn api_code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// The innermost cause of an error ("Connection refused (os error 111)"), without the layers
/// that repeat the URL.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}
