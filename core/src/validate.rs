//! Validation of the names and numbers that arrive from outside: job names become path
//! segments of object-store keys, so anything that could escape or alias a key is refused.

use crate::error::CoreError;

pub const JOB_NAME_BYTES_MAX: usize = 128;
/// Steps are printed zero-padded to 20 digits in keys, which holds every u64.
pub const STEP_DIGITS_MAX: usize = 20;

/// Job names: 1 to 128 characters from `[A-Za-z0-9._-]`, starting with a letter or digit.
/// That rules out `..`, `/`, NUL, empty and over-long names, and anything an object store or a
/// file system would treat specially.
pub fn validate_job(name: &str) -> Result<(), CoreError> {
    let bad = |reason| CoreError::InvalidJob { name: name.chars().take(JOB_NAME_BYTES_MAX + 8).collect(), reason };
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if name.len() > JOB_NAME_BYTES_MAX {
        return Err(bad("longer than 128 bytes"));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        return Err(bad("only letters, digits, '.', '_' and '-' are allowed"));
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(bad("must start with a letter or digit"));
    }
    if name.contains("..") {
        return Err(bad("must not contain '..'"));
    }
    Ok(())
}

/// Parses a step as it appears in a URL: decimal digits only, no sign, fits in u64.
pub fn parse_step(s: &str) -> Result<u64, CoreError> {
    let bad = |reason| CoreError::InvalidStep { value: s.chars().take(32).collect(), reason };
    if s.is_empty() {
        return Err(bad("empty"));
    }
    if s.starts_with('-') {
        return Err(bad("must not be negative"));
    }
    if !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("must be a non-negative decimal integer"));
    }
    if s.len() > STEP_DIGITS_MAX {
        return Err(bad("too large"));
    }
    s.parse::<u64>().map_err(|_| bad("too large"))
}

/// The bounds on what a save may contain. The service configures them; the core enforces them
/// when it validates a shard index, so a hostile or buggy client cannot make ckptd hold
/// unbounded state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub world_size_max: u32,
    pub tensors_per_rank_max: usize,
    pub chunk_bytes_max: u64,
    pub tensor_name_bytes_max: usize,
    pub tensor_dims_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            world_size_max: 65_536,
            tensors_per_rank_max: 100_000,
            chunk_bytes_max: 64 << 20,
            tensor_name_bytes_max: 1024,
            tensor_dims_max: 8,
        }
    }
}

pub fn validate_world_size(world_size: u32, limits: &Limits) -> Result<(), CoreError> {
    if world_size == 0 {
        return Err(CoreError::InvalidWorldSize { world_size, reason: "must be at least 1" });
    }
    if world_size > limits.world_size_max {
        return Err(CoreError::InvalidWorldSize { world_size, reason: "above the configured maximum" });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_names() {
        for ok in ["llama3-405b", "a", "run_1.2", &"x".repeat(128)] {
            assert!(validate_job(ok).is_ok(), "{ok}");
        }
        for bad in ["", "..", "a/b", "a\0b", "a..b", ".hidden", "-x", "a b", "é", &"x".repeat(129)] {
            assert!(validate_job(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn steps() {
        assert_eq!(parse_step("0").unwrap(), 0);
        assert_eq!(parse_step("18446744073709551615").unwrap(), u64::MAX);
        for bad in ["", "-1", "1.5", "abc", "+3", " 1", "18446744073709551616", "0x10"] {
            assert!(parse_step(bad).is_err(), "{bad:?}");
        }
    }
}
